"""Test harnesses: the sidecar process (sidecar). Fluent Bit's Go proxy is auditrelay.flbproxy."""
