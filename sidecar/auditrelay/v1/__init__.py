"""Generated gRPC stubs of proto/auditrelay/v1 (make generate). Never edit by hand."""
