"""The kubeadm, k3s, RKE2 and OpenShift files `auditrelay audit` is tested on, and the scripts that make them."""
