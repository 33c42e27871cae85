"""Turning kube-apiserver audit logging on where it is off, with a backup and a way back.

One module per concern: ``files`` (atomic writes, the per-node lock), ``yamledit`` (insertions
into YAML text that keep every other byte), ``kubeadm`` (the static pod manifest and the
ClusterConfiguration), ``rancher`` (the k3s and RKE2 config files), ``backup`` (what was
changed and how to undo it), ``readiness`` (the API server answers and writes its log),
``openshift`` (the APIServer resource's audit profile) and ``errors``. ``cli.audit`` wires them.
"""
