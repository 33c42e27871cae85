"""Test harnesses: the sidecar process (sidecar), Fluent Bit's side of a test (fluentbit: chunks,
one output instance, the sidecar's HTTP endpoints). Fluent Bit's Go proxy is auditrelay.devtools.flbproxy."""
