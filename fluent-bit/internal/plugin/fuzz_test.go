package plugin

// Coverage-guided fuzzing of what the plugin does with input it does not control: the
// properties of an [OUTPUT] section (ParseConfig) and the sidecar's answer to a Push
// (Flush). `go test` runs the seeds below; `make fuzz` runs each target with -fuzz.

import (
	"bytes"
	"context"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/auditrelay/auditrelay/fluent-bit/internal/properties"
	"github.com/auditrelay/auditrelay/fluent-bit/internal/relaypb"
)

// FuzzFlush pins, for any chunk, tag and answer of the sidecar: the chunk reaches the
// sidecar byte for byte under its tag, the flush never panics, and only an answer that
// says retrying can never help (REJECTED, INVALID_ARGUMENT) loses the chunk (FLB_ERROR);
// FLB_OK only for ACCEPTED.
func FuzzFlush(f *testing.F) {
	f.Add([]byte("\xdd\x00\x00\x00\x02"), "kube.audit", int32(1), uint32(0), "")
	f.Add([]byte{}, "", int32(2), uint32(0), "spool full")
	f.Add([]byte("\x92\x01\x80"), "t", int32(3), uint32(0), "no")
	f.Add([]byte("x"), "kube.audit", int32(0), uint32(codes.NotFound), "unknown pipeline")
	f.Add([]byte("x"), "kube.audit", int32(0), uint32(codes.InvalidArgument), "bad")
	f.Add([]byte("x"), "kube.audit", int32(99), uint32(0), "")
	f.Add([]byte("x"), "kube.audit", int32(1), uint32(codes.Unavailable), "down")
	f.Fuzz(func(t *testing.T, chunk []byte, tag string, reply int32, rpc uint32, message string) {
		code := codes.Code(rpc % 20)
		answer := relaypb.PushResponse_Status(reply)
		sidecar := &fakeSidecar{push: func(_ context.Context, call int, _ *relaypb.PushRequest) (*relaypb.PushResponse, error) {
			if code != codes.OK && call == 1 {
				return nil, status.Error(code, message)
			}
			return &relaypb.PushResponse{Status: answer, Message: message}, nil
		}}
		forwarder, _ := startedForwarder(t, sidecar, testConfig())
		got := forwarder.Flush(tag, chunk)
		if sidecar.pushCount() == 0 {
			t.Fatal("the chunk never reached the sidecar")
		}
		for _, push := range sidecar.pushes {
			if !bytes.Equal(push.GetChunk(), chunk) || push.GetTag() != tag {
				t.Fatalf("pushed %d bytes under %q, want the %d bytes of the flush under %q", len(push.GetChunk()), push.GetTag(), len(chunk), tag)
			}
		}
		final := answer
		if code != codes.OK && code != codes.NotFound { // NotFound: configured again, pushed again
			final = relaypb.PushResponse_STATUS_UNSPECIFIED
		}
		want := Retry
		switch {
		case code == codes.InvalidArgument:
			want = Error
		case final == relaypb.PushResponse_ACCEPTED:
			want = OK
		case final == relaypb.PushResponse_REJECTED:
			want = Error
		}
		if got != want {
			t.Fatalf("rpc %v, reply %v: got %v, want %v", code, answer, got, want)
		}
	})
}

// FuzzParseConfig pins, for any property values: no panic; a configuration without
// problems can be dialled (a target, positive timeouts); each problem names a known
// property; a secret value never shows in a problem.
func FuzzParseConfig(f *testing.F) {
	f.Add("unix:///run/auditrelay/relay.sock", "2s", "30s", "hunter2-secret", "")
	f.Add("127.0.0.1:7000", "500ms", "1m", "s3cr3t-value", "/nonexistent/ca.pem")
	f.Add("unix://relative", "-1s", "0", "x", "")
	f.Add("[::1]:65536", "1.5H", " 2 ", "", "")
	f.Fuzz(func(t *testing.T, address, timeout, wait, secret, ca string) {
		section := mapGetter{"sidecar_address": address, "sidecar_timeout": timeout, "sidecar_wait": wait}
		if secret != "" {
			section["client_secret"] = secret
		}
		if ca != "" {
			section["sidecar_tls_ca"] = ca
		}
		config, problems := ParseConfig(section)
		known := map[string]bool{}
		for _, prop := range properties.All {
			known[prop.Name] = true
		}
		for _, problem := range problems {
			if !known[problem.Property] {
				t.Fatalf("a problem with an unknown property: %v", problem)
			}
			if secretShows(problem, secret, section) {
				t.Fatalf("the secret shows in %q", problem.String())
			}
		}
		if len(problems) > 0 {
			return
		}
		if config.Target == "" || config.Timeout <= 0 || config.Wait <= 0 {
			t.Fatalf("a configuration without problems that cannot run: %+v", config)
		}
		if secret != "" && config.Properties["client_secret"] != secret {
			t.Fatal("the secret was not passed on to the sidecar as set")
		}
	})
}

// secretShows tells whether a problem carries the secret: as the value of client_secret, in
// the value of another property that does not itself hold it, or in the expectation where
// neither a value given nor a fixed text explains it. The rendered string is not searched:
// its quotes around a value can join with the value into the secret by chance ("'000").
func secretShows(problem Problem, secret string, section mapGetter) bool {
	if len(secret) < 4 {
		return false
	}
	if problem.Property == "client_secret" && problem.Value != "" {
		return true
	}
	if strings.Contains(problem.Value, secret) && !strings.Contains(section[problem.Property], secret) {
		return true
	}
	given := ""
	for name, value := range section {
		if name != "client_secret" {
			given += value + "\x00"
		}
	}
	return strings.Contains(problem.Expected, secret) && !strings.Contains(given, secret) &&
		!strings.Contains(problemTexts, secret)
}

// problemTexts is every fixed text a problem may carry; a secret that happens to be part
// of one is not a leak.
const problemTexts = "unix:///absolute/path.sock or host:port a duration such as 500ms, 5s, 2m or 1h " +
	"a positive duration a CA file when sidecar_address is host:port (TCP always uses TLS) " +
	"a readable PEM CA file a PEM file with at least one CA certificate property expected"
