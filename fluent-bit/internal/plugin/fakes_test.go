package plugin

import (
	"context"
	"strings"
	"sync"

	"google.golang.org/grpc"

	"github.com/auditrelay/auditrelay/fluent-bit/internal/relaypb"
)

// mapGetter is an [OUTPUT] section: the keys the user wrote.
type mapGetter map[string]string

func (m mapGetter) Get(key string) (string, bool) {
	value, ok := m[key]
	return value, ok
}

// fakeSidecar is a Client whose answers the test scripts; it records every request.
type fakeSidecar struct {
	mu         sync.Mutex
	configures []*relaypb.ConfigureRequest
	pushes     []*relaypb.PushRequest
	// configure answers each Configure; nil answers pipeline "p1".
	configure func(call int, req *relaypb.ConfigureRequest) (*relaypb.ConfigureResponse, error)
	// push answers each Push; nil accepts.
	push func(ctx context.Context, call int, req *relaypb.PushRequest) (*relaypb.PushResponse, error)
}

func (f *fakeSidecar) Configure(_ context.Context, req *relaypb.ConfigureRequest, _ ...grpc.CallOption) (*relaypb.ConfigureResponse, error) {
	f.mu.Lock()
	f.configures = append(f.configures, req)
	call := len(f.configures)
	f.mu.Unlock()
	if f.configure == nil {
		return &relaypb.ConfigureResponse{PipelineId: "p1"}, nil
	}
	return f.configure(call, req)
}

func (f *fakeSidecar) Push(ctx context.Context, req *relaypb.PushRequest, _ ...grpc.CallOption) (*relaypb.PushResponse, error) {
	f.mu.Lock()
	f.pushes = append(f.pushes, req)
	call := len(f.pushes)
	f.mu.Unlock()
	if f.push == nil {
		return &relaypb.PushResponse{Status: relaypb.PushResponse_ACCEPTED}, nil
	}
	return f.push(ctx, call, req)
}

func (f *fakeSidecar) configureCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.configures)
}

func (f *fakeSidecar) pushCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.pushes)
}

// recordingLog is Fluent Bit's log as a list of lines.
type recordingLog struct {
	mu    sync.Mutex
	lines []string
}

func (r *recordingLog) Log(level Level, line string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.lines = append(r.lines, levelNames[level]+" "+line)
}

var levelNames = map[Level]string{LevelError: "error", LevelWarn: "warn", LevelInfo: "info", LevelDebug: "debug"}

func (r *recordingLog) text() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return strings.Join(r.lines, "\n")
}

// closeCounter counts Close calls of a fake connection.
type closeCounter struct {
	mu     sync.Mutex
	closed int
}

func (c *closeCounter) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed++
	return nil
}

func (c *closeCounter) count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closed
}
