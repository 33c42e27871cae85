"""Test harnesses: Fluent Bit's Go proxy in ctypes (flb_proxy) and the sidecar process (sidecar)."""
