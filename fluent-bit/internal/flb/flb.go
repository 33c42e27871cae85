// Package flb is the small cgo shim between Fluent Bit's Go proxy and package plugin: the
// registration (with the config map on Fluent Bit 5.1.1+), property lookup, logging through
// Fluent Bit, and the per-instance context handle. It replaces github.com/fluent/fluent-bit-go,
// whose registration either lacks the config map or writes event_type past the end of the
// 32-byte definition that Fluent Bit up to v4.2.2 allocates.
package flb

/*
#include "flb.h"
*/
import "C"

import (
	"sync"
	"unsafe"

	"github.com/auditrelay/auditrelay/fluent-bit/internal/plugin"
	"github.com/auditrelay/auditrelay/fluent-bit/internal/properties"
)

// Return codes of an output callback.
const (
	Error = int(plugin.Error)
	OK    = int(plugin.OK)
	Retry = int(plugin.Retry)
)

// Registration strings and the config map are made once per process and never freed:
// Fluent Bit keeps pointers to them (the description, each map entry's desc) for as long
// as the plugin is registered, and registers it again after a hot reload.
var (
	registration sync.Once
	cName        *C.char
	cDescription *C.char
	cConfigMap   *C.struct_auditrelay_config_map
)

// Define fills Fluent Bit's plugin definition and reports whether the config map was
// declared. The config map field exists from Fluent Bit 5.1.1 on, which allocates the
// definition with 48 bytes; older versions allocate 32 or 40 bytes and have no version
// or size to ask for. The allocation itself tells: the map is written only when the
// block holding the definition has room for it, so the write can never land outside
// Fluent Bit's allocation, whatever the version.
func Define(def unsafe.Pointer) bool {
	registration.Do(func() {
		cName = C.CString(plugin.PluginName)
		cDescription = C.CString(plugin.Description)
		cConfigMap = newConfigMap(properties.All)
	})
	d := (*C.struct_auditrelay_proxy_def)(def)
	d._type = C.AUDITRELAY_FLB_PROXY_OUTPUT_PLUGIN
	d.proxy = C.AUDITRELAY_FLB_PROXY_GOLANG
	d.flags = 0
	d.name = cName
	d.description = cDescription
	if !HasConfigMapRoom(uintptr(C.malloc_usable_size(def))) {
		return false
	}
	C.auditrelay_set_config_map(def, cConfigMap)
	return true
}

// HasConfigMapRoom tells whether a definition block of usable bytes holds the
// config_map pointer at offset 40.
func HasConfigMapRoom(usable uintptr) bool {
	return usable >= C.AUDITRELAY_DEF_SIZE_WITH_CONFIG_MAP
}

// newConfigMap builds Fluent Bit's NULL-terminated array of struct flb_config_map: every
// property as a string, with its default and description, never set into a context.
func newConfigMap(props []properties.Property) *C.struct_auditrelay_config_map {
	size := C.size_t(unsafe.Sizeof(C.struct_auditrelay_config_map{}))
	first := (*C.struct_auditrelay_config_map)(C.calloc(C.size_t(len(props)+1), size))
	entries := unsafe.Slice(first, len(props)+1)
	for i, prop := range props {
		entries[i]._type = C.AUDITRELAY_FLB_CONFIG_MAP_STR
		entries[i].name = C.CString(prop.Name)
		if prop.HasDefault {
			entries[i].def_value = C.CString(prop.Default)
		}
		entries[i].desc = C.CString(prop.Description)
	}
	return first
}

// Output is one instance's view of Fluent Bit, captured in FLBPluginInit: the struct
// Fluent Bit passes there is shared by all instances and overwritten by the next init,
// so the API and instance pointers are copied out of it.
type Output struct {
	api      *C.struct_auditrelay_api
	instance unsafe.Pointer
	context  *C.struct_auditrelay_proxy_context
}

// NewOutput reads the struct flbgo_output_plugin passed to FLBPluginInit.
func NewOutput(goOutput unsafe.Pointer) *Output {
	p := (*C.struct_auditrelay_go_output)(goOutput)
	return &Output{api: p.api, instance: p.o_ins, context: p.context}
}

// Get returns a property of the instance; ok is false when it is not set. Valid only
// during FLBPluginInit.
func (o *Output) Get(key string) (string, bool) {
	cKey := C.CString(key)
	defer C.free(unsafe.Pointer(cKey))
	value := C.auditrelay_get_property(o.api, o.instance, cKey)
	if value == nil {
		return "", false
	}
	return C.GoString(value), true
}

// Log prints one line through Fluent Bit's log, honouring the instance's log_level.
func (o *Output) Log(level plugin.Level, line string) {
	cLine := C.CString(line)
	defer C.free(unsafe.Pointer(cLine))
	C.auditrelay_log(o.api, o.instance, C.int(level), cLine)
}

// contexts maps the handle Fluent Bit passes to flush and exit to the instance's value.
var contexts sync.Map

// SetContext stores value for this instance; Fluent Bit passes the handle back as the
// context of FLBPluginFlushCtx and FLBPluginExitCtx.
func (o *Output) SetContext(value any) {
	handle := C.malloc(1)
	contexts.Store(uintptr(handle), value)
	o.context.remote_context = handle
}

// Context returns the value stored for handle, or nil.
func Context(handle unsafe.Pointer) any {
	value, _ := contexts.Load(uintptr(handle))
	return value
}

// ForgetContext drops the value stored for handle and frees the handle.
func ForgetContext(handle unsafe.Pointer) {
	if _, ok := contexts.LoadAndDelete(uintptr(handle)); ok {
		C.free(handle)
	}
}
