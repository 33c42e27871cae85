"""auditrelay: Kubernetes API-server audit logs from Fluent Bit to Azure Monitor, for Defender."""

__version__ = "0.1.0"
