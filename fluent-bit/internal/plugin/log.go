package plugin

import "fmt"

// Level is a Fluent Bit log level (FLB_LOG_* in flb_log.h).
type Level int

// The levels the plugin logs at.
const (
	LevelError Level = 1
	LevelWarn  Level = 2
	LevelInfo  Level = 3
	LevelDebug Level = 4
)

// Logger writes one line to Fluent Bit's log; the output instance's log_level applies.
type Logger interface {
	Log(level Level, line string)
}

// instanceLog prefixes every line the way Fluent Bit's own output plugins do:
// "[output:auditrelay:auditrelay.0] ...".
type instanceLog struct {
	out    Logger
	prefix string
}

func newInstanceLog(out Logger, instance string) *instanceLog {
	return &instanceLog{out: out, prefix: fmt.Sprintf("[output:%s:%s] ", PluginName, instance)}
}

func (l *instanceLog) at(level Level, format string, args ...any) {
	l.out.Log(level, l.prefix+fmt.Sprintf(format, args...))
}

func (l *instanceLog) error(format string, args ...any) { l.at(LevelError, format, args...) }
func (l *instanceLog) warn(format string, args ...any)  { l.at(LevelWarn, format, args...) }
func (l *instanceLog) info(format string, args ...any)  { l.at(LevelInfo, format, args...) }
func (l *instanceLog) debug(format string, args ...any) { l.at(LevelDebug, format, args...) }
