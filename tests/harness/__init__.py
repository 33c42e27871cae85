"""Test harnesses: the sidecar process (sidecar, the launcher auditrelay demo uses too), Fluent
Bit's side of a test (fluentbit: chunks, one output instance, the sidecar's HTTP endpoints), the
emulator as a pipeline's destination (emulator). Fluent Bit's Go proxy is
auditrelay.devtools.flbproxy."""
