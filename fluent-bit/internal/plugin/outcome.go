package plugin

import (
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/auditrelay/auditrelay/fluent-bit/internal/relaypb"
)

// Code is a Fluent Bit output return code.
type Code int

// The codes of fluent-bit-go's flb_plugin.h.
const (
	// Error makes Fluent Bit drop the chunk (or move it to storage.rejected.path).
	Error Code = 0
	// OK makes Fluent Bit forget the chunk.
	OK Code = 1
	// Retry makes Fluent Bit keep the chunk and flush it again after a backoff.
	Retry Code = 2
)

func (c Code) String() string {
	switch c {
	case OK:
		return "FLB_OK"
	case Retry:
		return "FLB_RETRY"
	default:
		return "FLB_ERROR"
	}
}

// outcome is how one Push ended: a gRPC status code and, when that is OK, the reply's status.
type outcome struct {
	rpc   codes.Code
	reply relaypb.PushResponse_Status
}

// flbCodes is the one table from Push outcomes to Fluent Bit return codes. FLB_ERROR loses
// the chunk, so only answers that say retrying can never help map to it; everything else,
// including outcomes missing from the table, is retried: audit events must never be lost
// to a transient fault or to a sidecar newer than this plugin.
var flbCodes = map[outcome]Code{
	{codes.OK, relaypb.PushResponse_ACCEPTED}:    OK,
	{codes.OK, relaypb.PushResponse_RETRY_LATER}: Retry,
	{codes.OK, relaypb.PushResponse_REJECTED}:    Error,
	// A reply without a status comes from a broken or newer sidecar; keep the chunk.
	{codes.OK, relaypb.PushResponse_STATUS_UNSPECIFIED}: Retry,
	// The sidecar is down, restarting, slow or full.
	{rpc: codes.Unavailable}:       Retry,
	{rpc: codes.DeadlineExceeded}:  Retry,
	{rpc: codes.ResourceExhausted}: Retry,
	{rpc: codes.Canceled}:          Retry,
	{rpc: codes.Aborted}:           Retry,
	// The sidecar does not know the pipeline even after a fresh Configure.
	{rpc: codes.NotFound}: Retry,
	// A crash or bug in the sidecar while handling the chunk: the chunk may be fine.
	{rpc: codes.Internal}: Retry,
	{rpc: codes.Unknown}:  Retry,
	{rpc: codes.DataLoss}: Retry,
	// Not ready, or not allowed yet: a restart, an upgrade or a rotated certificate fixes it.
	{rpc: codes.FailedPrecondition}: Retry,
	{rpc: codes.Unimplemented}:      Retry,
	{rpc: codes.PermissionDenied}:   Retry,
	{rpc: codes.Unauthenticated}:    Retry,
	// The sidecar says this request can never be accepted, like REJECTED.
	{rpc: codes.InvalidArgument}: Error,
}

// codeFor maps the result of one Push to a Fluent Bit return code.
func codeFor(reply *relaypb.PushResponse, err error) Code {
	key := outcome{rpc: status.Code(err)}
	if err == nil {
		key.reply = reply.GetStatus()
	}
	if code, ok := flbCodes[key]; ok {
		return code
	}
	return Retry
}
