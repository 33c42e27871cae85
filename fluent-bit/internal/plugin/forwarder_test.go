package plugin

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/auditrelay/auditrelay/fluent-bit/internal/relaypb"
)

func testConfig() Config {
	return Config{
		Address: "unix:///run/test.sock", Target: "unix:///run/test.sock",
		Timeout: 2 * time.Second, Wait: 2 * time.Second,
		Properties: map[string]string{"stream": "Custom-Audit_CL"},
	}
}

func startedForwarder(t *testing.T, sidecar *fakeSidecar, config Config) (*Forwarder, *recordingLog) {
	t.Helper()
	log := &recordingLog{}
	forwarder := newForwarder("auditrelay.0", config, sidecar, newInstanceLog(log, "auditrelay.0"))
	if err := forwarder.Start(); err != nil {
		t.Fatalf("Start: %v", err)
	}
	return forwarder, log
}

// TestStartSendsPropertiesAndName pins the Configure request: the properties set, the
// instance name and the plugin version.
func TestStartSendsPropertiesAndName(t *testing.T) {
	sidecar := &fakeSidecar{}
	forwarder, _ := startedForwarder(t, sidecar, testConfig())
	got := sidecar.configures[0]
	if want := "auditrelay.0"; got.GetInstanceName() != want {
		t.Errorf("instance_name = %q, want %q", got.GetInstanceName(), want)
	}
	if want := Version; got.GetPluginVersion() != want {
		t.Errorf("plugin_version = %q, want %q", got.GetPluginVersion(), want)
	}
	if want := "Custom-Audit_CL"; got.GetProperties()["stream"] != want {
		t.Errorf("properties = %v, want stream=%s", got.GetProperties(), want)
	}
	if want := "p1"; forwarder.Pipeline() != want {
		t.Errorf("Pipeline() = %q, want %q", forwarder.Pipeline(), want)
	}
}

// TestStartFailsWithTheSidecarsPropertyErrors pins that a rejected configuration fails
// init at once with the sidecar's words, and never shows a secret's value.
func TestStartFailsWithTheSidecarsPropertyErrors(t *testing.T) {
	sidecar := &fakeSidecar{configure: func(int, *relaypb.ConfigureRequest) (*relaypb.ConfigureResponse, error) {
		return &relaypb.ConfigureResponse{Errors: []*relaypb.PropertyError{
			{Property: "stream", Value: "Audit", Expected: "a custom stream name"},
			{Property: "client_secret", Value: "s3cr3t", Expected: "a non-empty value"},
		}}, nil
	}}
	forwarder := newForwarder("auditrelay.0", testConfig(), sidecar, newInstanceLog(&recordingLog{}, "auditrelay.0"))
	err := forwarder.Start()
	want := "the sidecar rejected the configuration: property 'stream' = 'Audit': expected a custom stream name; " +
		"property 'client_secret': expected a non-empty value"
	if err == nil || err.Error() != want {
		t.Errorf("Start() = %v, want %q", err, want)
	}
	if want, got := 1, sidecar.configureCount(); want != got {
		t.Errorf("Configure calls = %d, want %d: a rejection is final", got, want)
	}
}

// TestStartWaitsForTheSidecar pins that init keeps trying while the sidecar is starting.
func TestStartWaitsForTheSidecar(t *testing.T) {
	sidecar := &fakeSidecar{configure: func(call int, _ *relaypb.ConfigureRequest) (*relaypb.ConfigureResponse, error) {
		if call < 3 {
			return nil, status.Error(codes.Unavailable, "connection refused")
		}
		return &relaypb.ConfigureResponse{PipelineId: "p7"}, nil
	}}
	forwarder, _ := startedForwarder(t, sidecar, testConfig())
	if want := "p7"; forwarder.Pipeline() != want {
		t.Errorf("Pipeline() = %q, want %q", forwarder.Pipeline(), want)
	}
}

// TestStartGivesUpAfterSidecarWait pins that init fails with the last error once
// sidecar_wait has passed.
func TestStartGivesUpAfterSidecarWait(t *testing.T) {
	sidecar := &fakeSidecar{configure: func(int, *relaypb.ConfigureRequest) (*relaypb.ConfigureResponse, error) {
		return nil, status.Error(codes.Unavailable, "connection refused")
	}}
	config := testConfig()
	config.Wait = 300 * time.Millisecond
	forwarder := newForwarder("auditrelay.0", config, sidecar, newInstanceLog(&recordingLog{}, "auditrelay.0"))
	started := time.Now()
	err := forwarder.Start()
	want := "the sidecar at unix:///run/test.sock did not answer within sidecar_wait 300ms: UNAVAILABLE: connection refused"
	if err == nil || err.Error() != want {
		t.Errorf("Start() = %v, want %q", err, want)
	}
	if elapsed := time.Since(started); elapsed < config.Wait {
		t.Errorf("Start gave up after %v, before sidecar_wait %v", elapsed, config.Wait)
	}
}

// TestFlushForwardsTheChunkUnchanged pins that one flush is one Push with the chunk's
// bytes, the tag and the pipeline.
func TestFlushForwardsTheChunkUnchanged(t *testing.T) {
	sidecar := &fakeSidecar{}
	forwarder, _ := startedForwarder(t, sidecar, testConfig())
	chunk := []byte{0x92, 0x92, 0xd7, 0x00, 0x65, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x80, 0x80}
	if want, got := OK, forwarder.Flush("kube.audit", chunk); want != got {
		t.Fatalf("Flush = %v, want %v", got, want)
	}
	push := sidecar.pushes[0]
	if !bytes.Equal(chunk, push.GetChunk()) || push.GetTag() != "kube.audit" || push.GetPipelineId() != "p1" {
		t.Errorf("Push = %v, want the chunk, tag kube.audit, pipeline p1", push)
	}
}

// TestFlushMapsReplies pins the return code for each reply of the sidecar.
func TestFlushMapsReplies(t *testing.T) {
	cases := map[relaypb.PushResponse_Status]Code{
		relaypb.PushResponse_ACCEPTED:    OK,
		relaypb.PushResponse_RETRY_LATER: Retry,
		relaypb.PushResponse_REJECTED:    Error,
	}
	for answer, want := range cases {
		sidecar := &fakeSidecar{push: func(context.Context, int, *relaypb.PushRequest) (*relaypb.PushResponse, error) {
			return &relaypb.PushResponse{Status: answer, Message: "why"}, nil
		}}
		forwarder, _ := startedForwarder(t, sidecar, testConfig())
		if got := forwarder.Flush("t", []byte{0x90}); want != got {
			t.Errorf("%v: Flush = %v, want %v", answer, got, want)
		}
	}
}

// TestFlushHasAHardDeadline pins that a sidecar that does not answer costs one
// sidecar_timeout and a retry, never a stalled Fluent Bit.
func TestFlushHasAHardDeadline(t *testing.T) {
	sidecar := &fakeSidecar{push: func(ctx context.Context, _ int, _ *relaypb.PushRequest) (*relaypb.PushResponse, error) {
		<-ctx.Done()
		return nil, status.FromContextError(ctx.Err()).Err()
	}}
	config := testConfig()
	config.Timeout = 200 * time.Millisecond
	forwarder, log := startedForwarder(t, sidecar, config)
	started := time.Now()
	if want, got := Retry, forwarder.Flush("kube.audit", []byte{0x90}); want != got {
		t.Errorf("Flush = %v, want %v", got, want)
	}
	if elapsed := time.Since(started); elapsed > 10*config.Timeout {
		t.Errorf("Flush took %v with sidecar_timeout %v", elapsed, config.Timeout)
	}
	want := "warn [output:auditrelay:auditrelay.0] chunk retried: tag=kube.audit bytes=1: DEADLINE_EXCEEDED: context deadline exceeded"
	if !strings.Contains(log.text(), want) {
		t.Errorf("log = %q, want a line %q", log.text(), want)
	}
}

// TestFlushReconfiguresAfterSidecarRestart pins that a sidecar which lost the pipeline
// (NOT_FOUND) is configured again and the same flush succeeds.
func TestFlushReconfiguresAfterSidecarRestart(t *testing.T) {
	sidecar := &fakeSidecar{
		configure: func(call int, _ *relaypb.ConfigureRequest) (*relaypb.ConfigureResponse, error) {
			return &relaypb.ConfigureResponse{PipelineId: fmt.Sprintf("p%d", call)}, nil
		},
		push: func(_ context.Context, _ int, req *relaypb.PushRequest) (*relaypb.PushResponse, error) {
			if req.GetPipelineId() == "p1" {
				return nil, status.Error(codes.NotFound, "unknown pipeline p1")
			}
			return &relaypb.PushResponse{Status: relaypb.PushResponse_ACCEPTED}, nil
		},
	}
	forwarder, log := startedForwarder(t, sidecar, testConfig())
	if want, got := OK, forwarder.Flush("kube.audit", []byte{0x90}); want != got {
		t.Errorf("Flush = %v, want %v", got, want)
	}
	if want, got := "p2", forwarder.Pipeline(); want != got {
		t.Errorf("Pipeline() = %q, want %q", got, want)
	}
	if want := "pipeline p2 configured again after a sidecar restart (was p1)"; !strings.Contains(log.text(), want) {
		t.Errorf("log = %q, want %q", log.text(), want)
	}
}

// TestFlushRetriesWhenReconfigureFails pins that a restarted sidecar that now rejects
// the configuration costs a retry, not the chunk.
func TestFlushRetriesWhenReconfigureFails(t *testing.T) {
	sidecar := &fakeSidecar{
		configure: func(call int, _ *relaypb.ConfigureRequest) (*relaypb.ConfigureResponse, error) {
			if call == 1 {
				return &relaypb.ConfigureResponse{PipelineId: "p1"}, nil
			}
			return &relaypb.ConfigureResponse{Errors: []*relaypb.PropertyError{{Property: "stream", Value: "x", Expected: "y"}}}, nil
		},
		push: func(context.Context, int, *relaypb.PushRequest) (*relaypb.PushResponse, error) {
			return nil, status.Error(codes.NotFound, "unknown pipeline")
		},
	}
	forwarder, log := startedForwarder(t, sidecar, testConfig())
	if want, got := Retry, forwarder.Flush("kube.audit", []byte{0x90}); want != got {
		t.Errorf("Flush = %v, want %v", got, want)
	}
	want := "chunk retried: tag=kube.audit bytes=1: the sidecar lost pipeline p1 and configuring it again failed: " +
		"the sidecar rejected the configuration: property 'stream' = 'x': expected y"
	if !strings.Contains(log.text(), want) {
		t.Errorf("log = %q, want %q", log.text(), want)
	}
}

// TestConcurrentFlushesReconfigureOnce pins that flushes of one instance on several
// worker threads share the forwarder safely, and that all of them finding the pipeline
// gone configure it only once.
func TestConcurrentFlushesReconfigureOnce(t *testing.T) {
	var restarted sync.Once
	gone := make(chan struct{})
	sidecar := &fakeSidecar{
		configure: func(call int, _ *relaypb.ConfigureRequest) (*relaypb.ConfigureResponse, error) {
			return &relaypb.ConfigureResponse{PipelineId: fmt.Sprintf("p%d", call)}, nil
		},
		push: func(_ context.Context, call int, req *relaypb.PushRequest) (*relaypb.PushResponse, error) {
			if call == 50 {
				restarted.Do(func() { close(gone) })
			}
			select {
			case <-gone:
				if req.GetPipelineId() == "p1" {
					return nil, status.Error(codes.NotFound, "unknown pipeline")
				}
			default:
			}
			return &relaypb.PushResponse{Status: relaypb.PushResponse_ACCEPTED, EventsReceived: 1}, nil
		},
	}
	forwarder, _ := startedForwarder(t, sidecar, testConfig())
	const workers, flushes = 8, 50
	var wg sync.WaitGroup
	codes := make(chan Code, workers*flushes)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range flushes {
				codes <- forwarder.Flush(fmt.Sprintf("worker.%d", w), []byte{byte(i)})
			}
		}()
	}
	wg.Wait()
	close(codes)
	for code := range codes {
		if code != OK {
			t.Fatalf("a flush returned %v, want every flush OK", code)
		}
	}
	if want, got := 2, sidecar.configureCount(); want != got {
		t.Errorf("Configure calls = %d, want %d (init and one reconfigure)", got, want)
	}
	if got := sidecar.pushCount(); got < workers*flushes {
		t.Errorf("Push calls = %d, want at least %d", got, workers*flushes)
	}
}
