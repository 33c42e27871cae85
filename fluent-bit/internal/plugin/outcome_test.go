package plugin

import (
	"errors"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/auditrelay/auditrelay/fluent-bit/internal/relaypb"
)

func reply(s relaypb.PushResponse_Status) *relaypb.PushResponse {
	return &relaypb.PushResponse{Status: s}
}

// TestCodeFor pins the mapping of every Push outcome to a Fluent Bit return code: only
// a chunk the sidecar says it can never take is dropped, everything else is retried.
func TestCodeFor(t *testing.T) {
	cases := []struct {
		name  string
		reply *relaypb.PushResponse
		err   error
		want  Code
	}{
		{"accepted", reply(relaypb.PushResponse_ACCEPTED), nil, OK},
		{"retry later", reply(relaypb.PushResponse_RETRY_LATER), nil, Retry},
		{"rejected", reply(relaypb.PushResponse_REJECTED), nil, Error},
		{"no status", reply(relaypb.PushResponse_STATUS_UNSPECIFIED), nil, Retry},
		{"status from a newer sidecar", reply(relaypb.PushResponse_Status(42)), nil, Retry},
		{"unavailable", nil, status.Error(codes.Unavailable, "connection refused"), Retry},
		{"deadline exceeded", nil, status.Error(codes.DeadlineExceeded, "slow"), Retry},
		{"resource exhausted", nil, status.Error(codes.ResourceExhausted, "too big"), Retry},
		{"canceled", nil, status.Error(codes.Canceled, ""), Retry},
		{"aborted", nil, status.Error(codes.Aborted, ""), Retry},
		{"not found after reconfigure", nil, status.Error(codes.NotFound, "pipeline"), Retry},
		{"internal", nil, status.Error(codes.Internal, "bug"), Retry},
		{"unknown", nil, status.Error(codes.Unknown, ""), Retry},
		{"data loss", nil, status.Error(codes.DataLoss, ""), Retry},
		{"failed precondition", nil, status.Error(codes.FailedPrecondition, ""), Retry},
		{"unimplemented", nil, status.Error(codes.Unimplemented, ""), Retry},
		{"permission denied", nil, status.Error(codes.PermissionDenied, ""), Retry},
		{"unauthenticated", nil, status.Error(codes.Unauthenticated, ""), Retry},
		{"invalid argument", nil, status.Error(codes.InvalidArgument, "bad chunk"), Error},
		{"out of range is not in the table", nil, status.Error(codes.OutOfRange, ""), Retry},
		{"not a gRPC error", nil, errors.New("boom"), Retry},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := codeFor(tc.reply, tc.err); tc.want != got {
				t.Errorf("codeFor = %v, want %v", got, tc.want)
			}
		})
	}
}

// TestCodeValuesMatchFluentBit pins the numeric codes Fluent Bit's proxy expects.
func TestCodeValuesMatchFluentBit(t *testing.T) {
	if Error != 0 || OK != 1 || Retry != 2 {
		t.Errorf("codes = %d/%d/%d, want FLB_ERROR=0 FLB_OK=1 FLB_RETRY=2", Error, OK, Retry)
	}
}

// TestDescribeSpellsCodesLikeTheProtocol pins how a gRPC failure reads in Fluent Bit's log.
func TestDescribeSpellsCodesLikeTheProtocol(t *testing.T) {
	cases := map[codes.Code]string{
		codes.DeadlineExceeded:  "DEADLINE_EXCEEDED: m",
		codes.Unavailable:       "UNAVAILABLE: m",
		codes.Canceled:          "CANCELLED: m",
		codes.ResourceExhausted: "RESOURCE_EXHAUSTED: m",
	}
	for code, want := range cases {
		if got := describe(status.Error(code, "m")); want != got {
			t.Errorf("describe(%v) = %q, want %q", code, got, want)
		}
	}
}
