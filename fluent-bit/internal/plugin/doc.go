// Package plugin is the auditrelay Fluent Bit output plugin without cgo: it reads an
// instance's properties through a Getter, forwards every flush to the sidecar as one gRPC
// Push through a Client, and maps the answer to a Fluent Bit return code with one table.
// The cgo side (package flb and main.go) only adapts Fluent Bit's C calls to it.
package plugin
