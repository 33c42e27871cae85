package plugin

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/auditrelay/auditrelay/fluent-bit/internal/properties"
	"github.com/auditrelay/auditrelay/fluent-bit/internal/relaypb"
)

// Version is the plugin's version, sent in Configure for the sidecar's logs.
const Version = "0.1.0"

// Client is the part of the sidecar's gRPC API the plugin uses; relaypb.RelayClient has it.
type Client interface {
	Configure(ctx context.Context, in *relaypb.ConfigureRequest, opts ...grpc.CallOption) (*relaypb.ConfigureResponse, error)
	Push(ctx context.Context, in *relaypb.PushRequest, opts ...grpc.CallOption) (*relaypb.PushResponse, error)
}

// Forwarder is one [OUTPUT] instance: it turns every flush into one Push. Flush is safe
// for concurrent use (Fluent Bit's `workers` flush one instance on several threads).
type Forwarder struct {
	name    string
	config  Config
	client  Client
	log     *instanceLog
	release func(keep bool)

	pipelineMu sync.RWMutex
	pipelineID string
	// configuring admits one Configure at a time, so that concurrent flushes that all find
	// the pipeline gone configure it once.
	configuring chan struct{}
}

func newForwarder(name string, config Config, client Client, log *instanceLog) *Forwarder {
	return &Forwarder{name: name, config: config, client: client, log: log, configuring: make(chan struct{}, 1)}
}

// Name is the instance name the forwarder logs and configures with.
func (f *Forwarder) Name() string { return f.name }

// Pipeline is the sidecar's pipeline id for this instance.
func (f *Forwarder) Pipeline() string {
	f.pipelineMu.RLock()
	defer f.pipelineMu.RUnlock()
	return f.pipelineID
}

func (f *Forwarder) setPipeline(id string) {
	f.pipelineMu.Lock()
	defer f.pipelineMu.Unlock()
	f.pipelineID = id
}

// errRejected is a configuration the sidecar refused; retrying cannot help.
type errRejected struct{ problems []Problem }

func (e errRejected) Error() string {
	return "the sidecar rejected the configuration: " + joinProblems(e.problems)
}

func joinProblems(problems []Problem) string {
	texts := make([]string, len(problems))
	for i, problem := range problems {
		texts[i] = problem.String()
	}
	return strings.Join(texts, "; ")
}

func (f *Forwarder) configureRequest() *relaypb.ConfigureRequest {
	return &relaypb.ConfigureRequest{Properties: f.config.Properties, InstanceName: f.name, PluginVersion: Version}
}

// configure asks the sidecar for this instance's pipeline and remembers it.
func (f *Forwarder) configure(ctx context.Context, opts ...grpc.CallOption) error {
	reply, err := f.client.Configure(ctx, f.configureRequest(), opts...)
	if err != nil {
		return err
	}
	if len(reply.GetErrors()) > 0 {
		return errRejected{problems: problemsFrom(reply.GetErrors())}
	}
	if reply.GetPipelineId() == "" {
		return errors.New("the sidecar answered Configure without a pipeline id")
	}
	f.setPipeline(reply.GetPipelineId())
	return nil
}

// problemsFrom converts the sidecar's property errors, blanking secrets once more.
func problemsFrom(errs []*relaypb.PropertyError) []Problem {
	secret := map[string]bool{}
	for _, prop := range properties.All {
		secret[prop.Name] = prop.Secret
	}
	problems := make([]Problem, len(errs))
	for i, e := range errs {
		problems[i] = Problem{Property: e.GetProperty(), Value: e.GetValue(), Expected: e.GetExpected()}
		if secret[e.GetProperty()] {
			problems[i].Value = ""
		}
	}
	return problems
}

// startRetryable is every Configure failure worth another attempt while init waits.
var startRetryable = map[codes.Code]bool{
	codes.Unavailable: true, codes.DeadlineExceeded: true, codes.ResourceExhausted: true,
	codes.Aborted: true, codes.Internal: true, codes.Unknown: true,
}

// startPause is the pause between Configure attempts at init; connecting itself already
// waits for the socket (WaitForReady).
const startPause = 100 * time.Millisecond

// Start waits up to sidecar_wait for the sidecar and configures the pipeline.
func (f *Forwarder) Start() error {
	deadline := time.Now().Add(f.config.Wait)
	for {
		ctx, cancel := context.WithDeadline(context.Background(), deadline)
		err := f.configure(ctx, grpc.WaitForReady(true))
		cancel()
		if err == nil {
			return nil
		}
		var rejected errRejected
		if errors.As(err, &rejected) {
			return err
		}
		remaining := time.Until(deadline)
		if !startRetryable[status.Code(err)] || remaining <= 0 {
			return fmt.Errorf("the sidecar at %s did not answer within sidecar_wait %s: %s", f.config.Address, f.config.Wait, f.describe(err))
		}
		time.Sleep(min(startPause, remaining))
	}
}

// Flush hands one chunk to the sidecar and maps the answer to a Fluent Bit return code.
// The whole flush, including a reconfiguration after a sidecar restart, ends within
// sidecar_timeout.
func (f *Forwarder) Flush(tag string, chunk []byte) Code {
	ctx, cancel := context.WithTimeout(context.Background(), f.config.Timeout)
	defer cancel()
	pipeline := f.Pipeline()
	reply, err := f.push(ctx, pipeline, tag, chunk)
	if status.Code(err) == codes.NotFound {
		fresh, configureErr := f.reconfigure(ctx, pipeline)
		if configureErr != nil {
			f.log.warn("chunk retried: tag=%s bytes=%d: the sidecar lost pipeline %s and configuring it again failed: %s", tag, len(chunk), pipeline, f.describe(configureErr))
			return Retry
		}
		reply, err = f.push(ctx, fresh, tag, chunk)
	}
	code := codeFor(reply, err)
	f.logFlush(tag, len(chunk), reply, err, code)
	return code
}

func (f *Forwarder) push(ctx context.Context, pipeline, tag string, chunk []byte) (*relaypb.PushResponse, error) {
	return f.client.Push(ctx, &relaypb.PushRequest{PipelineId: pipeline, Tag: tag, Chunk: chunk})
}

// reconfigure configures the pipeline again after the sidecar answered NOT_FOUND for
// stale; of several flushes that find it gone at once, one configures and the others
// reuse its answer.
func (f *Forwarder) reconfigure(ctx context.Context, stale string) (string, error) {
	select {
	case f.configuring <- struct{}{}:
		defer func() { <-f.configuring }()
	case <-ctx.Done():
		return "", ctx.Err()
	}
	if current := f.Pipeline(); current != stale {
		return current, nil
	}
	if err := f.configure(ctx); err != nil {
		return "", err
	}
	fresh := f.Pipeline()
	if fresh == stale {
		f.log.info("pipeline %s configured again after a sidecar restart", fresh)
	} else {
		f.log.info("pipeline %s configured again after a sidecar restart (was %s)", fresh, stale)
	}
	return fresh, nil
}

func (f *Forwarder) logFlush(tag string, size int, reply *relaypb.PushResponse, err error, code Code) {
	switch code {
	case OK:
		f.log.debug("chunk accepted: tag=%s bytes=%d events=%d accepted=%d filtered=%d invalid=%d", tag, size,
			reply.GetEventsReceived(), reply.GetEventsAccepted(), reply.GetEventsFiltered(), reply.GetEventsInvalid())
	case Retry:
		f.log.warn("chunk retried: tag=%s bytes=%d: %s%s", tag, size, reason(reply, err), tlsHint(f.config.TLS, err))
	default:
		f.log.error("chunk rejected: tag=%s bytes=%d: %s%s", tag, size, reason(reply, err), tlsHint(f.config.TLS, err))
	}
}

// reason is why a Push did not end in ACCEPTED, in a few words.
func reason(reply *relaypb.PushResponse, err error) string {
	if err != nil {
		return describe(err)
	}
	if reply.GetMessage() != "" {
		return fmt.Sprintf("%s: %s", reply.GetStatus(), reply.GetMessage())
	}
	return reply.GetStatus().String()
}

// describe renders an error of a gRPC call as "CODE: message", with why a TLS connection
// was most likely closed when that is the cause.
func (f *Forwarder) describe(err error) string {
	return describe(err) + tlsHint(f.config.TLS, err)
}

// describe renders an error of a gRPC call as "CODE: message".
func describe(err error) string {
	if s, ok := status.FromError(err); ok {
		return fmt.Sprintf("%s: %s", strings.ToUpper(codeName(s.Code())), s.Message())
	}
	return err.Error()
}

// codeName spells a gRPC code the way the protocol does (DEADLINE_EXCEEDED, CANCELLED).
func codeName(code codes.Code) string {
	if code == codes.Canceled {
		return "CANCELLED"
	}
	var out []rune
	for i, r := range code.String() {
		if i > 0 && r >= 'A' && r <= 'Z' {
			out = append(out, '_')
		}
		out = append(out, r)
	}
	return string(out)
}
