"""Benchmarks of the relay: corpus builder, SDK baseline, sidecar pipeline, end to end."""
