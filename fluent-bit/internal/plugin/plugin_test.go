package plugin

import (
	"io"
	"strings"
	"sync"
	"testing"

	"github.com/auditrelay/auditrelay/fluent-bit/internal/relaypb"
)

// fakeDialer hands out one fake sidecar per target and counts connections.
type fakeDialer struct {
	mu       sync.Mutex
	sidecar  *fakeSidecar
	dialed   int
	closings []*closeCounter
}

func (d *fakeDialer) dial(Config) (Client, io.Closer, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.dialed++
	closer := &closeCounter{}
	d.closings = append(d.closings, closer)
	return d.sidecar, closer, nil
}

func unixSection(path string) mapGetter {
	return mapGetter{"sidecar_address": "unix://" + path, "sidecar_wait": "1s"}
}

// TestInstancesShareAConnectionAndHaveTheirOwnNames pins that two [OUTPUT] sections with
// the same sidecar share one connection, get names in config order, and each their
// own pipeline; the connection closes when the last of them exits at shutdown.
func TestInstancesShareAConnectionAndHaveTheirOwnNames(t *testing.T) {
	dialer := &fakeDialer{sidecar: &fakeSidecar{configure: func(call int, req *relaypb.ConfigureRequest) (*relaypb.ConfigureResponse, error) {
		return &relaypb.ConfigureResponse{PipelineId: req.GetInstanceName()}, nil
	}}}
	relay := New(dialer.dial)
	relay.Registered()
	log := &recordingLog{}
	first := relay.Init(unixSection("/run/a.sock"), log)
	second := relay.Init(unixSection("/run/a.sock"), log)
	if first == nil || second == nil {
		t.Fatalf("Init failed: %s", log.text())
	}
	if first.Name() != "auditrelay.0" || second.Name() != "auditrelay.1" {
		t.Errorf("names = %s, %s; want auditrelay.0, auditrelay.1", first.Name(), second.Name())
	}
	if want, got := 1, dialer.dialed; want != got {
		t.Errorf("connections dialed = %d, want %d", got, want)
	}
	relay.PreExit(false)
	relay.Exit(first)
	if want, got := 0, dialer.closings[0].count(); want != got {
		t.Errorf("closed = %d while an instance still uses it, want %d", got, want)
	}
	relay.Exit(second)
	if want, got := 1, dialer.closings[0].count(); want != got {
		t.Errorf("closed = %d after the last exit, want %d", got, want)
	}
	if want := "info [output:auditrelay:auditrelay.1] connected to the sidecar at unix:///run/a.sock: pipeline auditrelay.1"; !strings.Contains(log.text(), want) {
		t.Errorf("log = %q, want %q", log.text(), want)
	}
}

// TestHotReloadKeepsConnections pins that across a hot reload (exits announced as a
// reload, then a new registration in the same process) the connection is kept and
// reused, and instance names start again from 0.
func TestHotReloadKeepsConnections(t *testing.T) {
	dialer := &fakeDialer{sidecar: &fakeSidecar{}}
	relay := New(dialer.dial)
	relay.Registered()
	log := &recordingLog{}
	before := relay.Init(unixSection("/run/a.sock"), log)
	relay.PreExit(true)
	relay.Exit(before)
	relay.Registered()
	after := relay.Init(unixSection("/run/a.sock"), log)
	if after == nil {
		t.Fatalf("Init after reload failed: %s", log.text())
	}
	if want, got := 1, dialer.dialed; want != got {
		t.Errorf("connections dialed = %d, want %d", got, want)
	}
	if want, got := 0, dialer.closings[0].count(); want != got {
		t.Errorf("closed = %d, want %d", got, want)
	}
	if want, got := "auditrelay.0", after.Name(); want != got {
		t.Errorf("name after reload = %q, want %q", got, want)
	}
	relay.PreExit(false)
	relay.Exit(after)
	if want, got := 0, relay.Connections(); want != got {
		t.Errorf("open connections after shutdown = %d, want %d", got, want)
	}
}

// TestInitFailsOnBadProperties pins that init refuses a bad plugin property with one
// error line naming it, without dialing anything.
func TestInitFailsOnBadProperties(t *testing.T) {
	dialer := &fakeDialer{sidecar: &fakeSidecar{}}
	relay := New(dialer.dial)
	log := &recordingLog{}
	if forwarder := relay.Init(mapGetter{"sidecar_timeout": "fast"}, log); forwarder != nil {
		t.Fatal("Init succeeded with sidecar_timeout fast")
	}
	want := "error [output:auditrelay:auditrelay.0] invalid configuration: property 'sidecar_timeout' = 'fast': expected a duration such as 500ms, 5s, 2m or 1h"
	if want != log.text() {
		t.Errorf("log = %q, want %q", log.text(), want)
	}
	if want, got := 0, dialer.dialed; want != got {
		t.Errorf("connections dialed = %d, want %d", got, want)
	}
}

// TestInitFailureNeverLogsASecret pins that a secret never reaches Fluent Bit's log,
// even when a sidecar echoes its value in an error.
func TestInitFailureNeverLogsASecret(t *testing.T) {
	dialer := &fakeDialer{sidecar: &fakeSidecar{configure: func(int, *relaypb.ConfigureRequest) (*relaypb.ConfigureResponse, error) {
		return &relaypb.ConfigureResponse{Errors: []*relaypb.PropertyError{{Property: "client_secret", Value: "s3cr3t", Expected: "something else"}}}, nil
	}}}
	relay := New(dialer.dial)
	log := &recordingLog{}
	section := unixSection("/run/a.sock")
	section["client_secret"] = "s3cr3t"
	if forwarder := relay.Init(section, log); forwarder != nil {
		t.Fatal("Init succeeded although the sidecar rejected the configuration")
	}
	if strings.Contains(log.text(), "s3cr3t") {
		t.Errorf("log shows the secret: %q", log.text())
	}
	if want := "property 'client_secret': expected something else"; !strings.Contains(log.text(), want) {
		t.Errorf("log = %q, want %q", log.text(), want)
	}
	if want, got := 0, relay.Connections(); want != got {
		t.Errorf("open connections after a failed init = %d, want %d", got, want)
	}
}
