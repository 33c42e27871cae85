// Command out_auditrelay is the auditrelay Fluent Bit output plugin, built as a shared
// library: go build -buildmode=c-shared -o out_auditrelay.so . (make plugin). This file
// holds only the entry points Fluent Bit's Go proxy calls; the logic is in
// internal/plugin and the C structures in internal/flb.
package main

import "C"

import (
	"unsafe"

	"github.com/auditrelay/auditrelay/fluent-bit/internal/flb"
	"github.com/auditrelay/auditrelay/fluent-bit/internal/plugin"
)

// relay lives as long as the process: Fluent Bit cannot unload a Go runtime, and after a
// hot reload it registers and initialises the plugin again in the same process.
var relay = plugin.New(plugin.DialGRPC)

// FLBPluginRegister declares the output `auditrelay` (and its config map where the
// running Fluent Bit has one).
//
//export FLBPluginRegister
func FLBPluginRegister(def unsafe.Pointer) int {
	flb.Define(def)
	relay.Registered()
	return 0
}

// FLBPluginInit starts one [OUTPUT] instance; it fails when the configuration is invalid
// or the sidecar rejects it or stays away for sidecar_wait.
//
//export FLBPluginInit
func FLBPluginInit(goOutput unsafe.Pointer) int {
	output := flb.NewOutput(goOutput)
	forwarder := relay.Init(output, output)
	if forwarder == nil {
		return flb.Error
	}
	output.SetContext(forwarder)
	return flb.OK
}

// FLBPluginFlushCtx forwards one chunk. data and tag are only valid during the call.
//
//export FLBPluginFlushCtx
func FLBPluginFlushCtx(ctx, data unsafe.Pointer, length C.size_t, tag *C.char) int {
	forwarder, ok := flb.Context(ctx).(*plugin.Forwarder)
	if !ok {
		return flb.Error
	}
	return int(forwarder.Flush(C.GoString(tag), C.GoBytes(data, C.int(length))))
}

// FLBPluginOutputPreExit tells whether the exits that follow are for a hot reload.
//
//export FLBPluginOutputPreExit
func FLBPluginOutputPreExit(shutdownByHotReloading C.int) {
	relay.PreExit(shutdownByHotReloading != 0)
}

// FLBPluginExitCtx stops one instance.
//
//export FLBPluginExitCtx
func FLBPluginExitCtx(ctx unsafe.Pointer) int {
	if forwarder, ok := flb.Context(ctx).(*plugin.Forwarder); ok {
		relay.Exit(forwarder)
	}
	flb.ForgetContext(ctx)
	return flb.OK
}

// FLBPluginUnregister runs when Fluent Bit destroys the plugin (shutdown or reload). The
// registration strings stay allocated for the next registration in this process.
//
//export FLBPluginUnregister
func FLBPluginUnregister(def unsafe.Pointer) {}

func main() {}
