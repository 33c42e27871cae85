"""What ``auditrelay demo`` and the tests drive the sidecar and the plugin with; never the sidecar's
own runtime (an import-linter contract keeps ``serve``'s modules from importing it).

- ``flbproxy``: Fluent Bit's Go output proxy in ctypes; loads ``out_auditrelay.so`` and calls it
  as Fluent Bit does, so the demo and the tests run the real plugin without a Fluent Bit binary.
- ``sidecar``: ``auditrelay serve`` as a child process, awaited through grpc.health.v1.

They ship in the wheel because ``auditrelay demo`` runs from an installed package: a machine
with the wheel and a built plugin (``--plugin``) needs nothing else to see the whole path work.
"""
