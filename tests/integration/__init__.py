"""Integration tests: the real plugin, sidecar and emulator on loopback."""
