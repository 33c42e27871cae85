"""The chart, rendered by the real helm with each values file of helm/auditrelay/ci/.

The first use of helm may build it (tests/helm/build.py, a few minutes of one core), hence the
long timeout of this module.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from auditrelay.fluentbit_conf import parse_classic

from helm.conftest import (
    CHART,
    KUBE_VERSION,
    NAMESPACE,
    RELEASE,
    Render,
    Rendered,
    RenderError,
    RenderText,
    ci_file,
)

pytestmark = pytest.mark.timeout(900)

FULLNAME = f"{RELEASE}-auditrelay"
KUBE_FLAG = ("--kube-version", KUBE_VERSION)
SOCKET_DIR = "/run/auditrelay"


def test_lint_strict_passes(helm_binary: Path, ci_values: Path) -> None:
    """`helm lint --strict` finds nothing to warn about with any of the ci values files."""
    result = subprocess.run(
        [str(helm_binary), "lint", "--strict", str(CHART), "--values", str(ci_values), *KUBE_FLAG],
        capture_output=True,
        text=True,
        check=False,
    )
    assert 0 == result.returncode, result.stdout + result.stderr


def test_manifests_decode_strictly_as_kubernetes_objects(
    render_text: RenderText, kubecheck_binary: Path, ci_values: Path
) -> None:
    """Every rendered object of a k8s.io/api kind decodes into its type with no unknown field and
    no wrong type, as the API server's strict field validation would demand."""
    result = subprocess.run(
        [str(kubecheck_binary)],
        input=render_text(ci_values),
        capture_output=True,
        text=True,
        check=False,
    )
    assert 0 == result.returncode, result.stderr
    assert f"checked DaemonSet {FULLNAME}" in result.stdout.splitlines()


def test_kubecheck_refuses_a_misspelt_field(kubecheck_binary: Path) -> None:
    """The manifest check can fail: a DaemonSet with a misspelt field is refused, naming it."""
    manifest = (
        "apiVersion: apps/v1\nkind: DaemonSet\nmetadata:\n  name: x\n"
        "spec:\n  template:\n    spec:\n      containers:\n        - name: a\n          imag: b\n"
    )
    result = subprocess.run(
        [str(kubecheck_binary)], input=manifest, capture_output=True, text=True, check=False
    )
    assert 1 == result.returncode
    assert 'unknown field "spec.template.spec.containers[0].imag"' in result.stderr


def test_socket_is_shared_between_fluent_bit_and_the_sidecar(
    render: Render, ci_values: Path
) -> None:
    """Both containers mount one in-memory emptyDir at the socket's directory, the plugin is told
    the socket the sidecar listens on, and the pod's fsGroup is the sidecar's group, so Fluent Bit
    may open the 0660 socket."""
    rendered = render(ci_values)
    fluent_bit, sidecar = rendered.container("fluent-bit"), rendered.container("sidecar")
    assert "socket" == Rendered.mounts(fluent_bit)[SOCKET_DIR]["name"]
    assert "socket" == Rendered.mounts(sidecar)[SOCKET_DIR]["name"]
    assert {"medium": "Memory", "sizeLimit": "1Mi"} == rendered.volume("socket")["emptyDir"]
    address = f"unix://{SOCKET_DIR}/relay.sock"
    assert address == Rendered.env(sidecar)["AUDITRELAY_LISTEN"]
    assert address == rendered.section("OUTPUT", "auditrelay")["sidecar_address"]
    assert sidecar["securityContext"]["runAsGroup"] == rendered.pod["securityContext"]["fsGroup"]


def test_plugin_is_copied_from_our_image_and_loaded_by_absolute_path(
    render: Render, ci_values: Path
) -> None:
    """An init container of our image copies out_auditrelay.so into an emptyDir that the official
    Fluent Bit image mounts read-only; plugins.conf names it by absolute path, and Plugins_File is
    absolute (a relative one breaks hot reload)."""
    rendered = render(ci_values)
    install = rendered.container("install-plugin")
    sidecar, fluent_bit = rendered.container("sidecar"), rendered.container("fluent-bit")
    assert sidecar["image"] == install["image"]
    assert ["cp", "/opt/auditrelay/out_auditrelay.so", "/plugins/out_auditrelay.so"] == install[
        "command"
    ]
    assert "plugins" == Rendered.mounts(install)["/plugins"]["name"]
    assert {"sizeLimit": "64Mi"} == rendered.volume("plugins")["emptyDir"]
    assert fluent_bit["image"].startswith("cr.fluentbit.io/fluent/fluent-bit:4.2.")
    plugin_mount = Rendered.mounts(fluent_bit)["/fluent-bit/plugins"]
    assert {"name": "plugins", "mountPath": "/fluent-bit/plugins", "readOnly": True} == plugin_mount
    plugins = parse_classic(rendered.config_files["plugins.conf"])
    assert [("PLUGINS", {"path": "/fluent-bit/plugins/out_auditrelay.so"})] == plugins
    plugins_file = rendered.section("SERVICE")["plugins_file"]
    assert "/fluent-bit/etc/conf/plugins.conf" == plugins_file
    assert "config" == Rendered.mounts(fluent_bit)["/fluent-bit/etc/conf"]["name"]
    assert ["--workdir=/fluent-bit/etc", "--config=/fluent-bit/etc/conf/fluent-bit.conf"] == (
        fluent_bit["args"][:2]
    )


def test_output_section_carries_the_azure_settings(render: Render) -> None:
    """The azure.* values become the properties of the auditrelay output, next to the keys that
    keep audit data (workers, no retry limit, a bounded disk backlog)."""
    rendered = render(ci_file("openshift-values"))
    expected = {
        "name": "auditrelay",
        "match": "kube.audit",
        "workers": "1",
        "retry_limit": "no_limits",
        "storage.total_limit_size": "2G",
        "sidecar_address": "unix:///run/auditrelay/relay.sock",
        "endpoint": "https://auditrelay-abcd.westeurope-1.ingest.monitor.azure.com",
        "dcr_id": "dcr-0123456789abcdef0123456789abcdef",
        "cloud": "public",
        "auth": "workload_identity",
        "tenant_id": "00000000-0000-0000-0000-000000000002",
        "client_id": "00000000-0000-0000-0000-000000000001",
        "stream": "Custom-KubeAudit_CL",
        "cluster_name": "ocp-1",
        "cluster_id": "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg/"
        "providers/Microsoft.Kubernetes/connectedClusters/ocp-1",
    }
    assert expected == rendered.section("OUTPUT", "auditrelay")


def test_extra_properties_reach_the_output_section(render: Render) -> None:
    """azure.extraProperties adds any other pipeline property to the output section."""
    output = render(ci_file("existing-policy-values")).section("OUTPUT", "auditrelay")
    assert ("2s", "4G") == (output["batch_interval"], output["spool_limit"])


def test_workload_identity_is_the_default(render: Render) -> None:
    """By default the service account carries the identity's client id and the pod the label the
    workload identity webhook looks for."""
    rendered = render(ci_file("default-values"))
    annotations = rendered.one("ServiceAccount")["metadata"]["annotations"]
    expected = "00000000-0000-0000-0000-000000000001"
    assert expected == annotations["azure.workload.identity/client-id"]
    assert "true" == rendered.pod_metadata["labels"]["azure.workload.identity/use"]
    assert "workload_identity" == rendered.section("OUTPUT", "auditrelay")["auth"]


def test_workload_identity_without_webhook_mounts_a_projected_token(render: Render) -> None:
    """Without the webhook the chart projects a token for api://AzureADTokenExchange into the
    sidecar and points federated_token_file at it."""
    rendered = render(ci_file("existing-policy-values"))
    assert "azure.workload.identity/use" not in rendered.pod_metadata["labels"]
    source = rendered.volume("azure-token")["projected"]["sources"][0]["serviceAccountToken"]
    assert ("api://AzureADTokenExchange", "token") == (source["audience"], source["path"])
    mount = Rendered.mounts(rendered.container("sidecar"))[
        "/var/run/secrets/auditrelay/azure-token"
    ]
    assert "azure-token" == mount["name"]
    output = rendered.section("OUTPUT", "auditrelay")
    assert "/var/run/secrets/auditrelay/azure-token/token" == output["federated_token_file"]


def test_client_secret_comes_only_from_an_existing_secret(render: Render) -> None:
    """With clientSecret auth the output names an environment variable, which Fluent Bit fills
    from the Secret the operator made; the secret is never a chart value."""
    rendered = render(ci_file("client-secret-values"))
    assert (
        "${AUDITRELAY_AZURE_CLIENT_SECRET}"
        == rendered.section("OUTPUT", "auditrelay")["client_secret"]
    )
    expected = {"secretKeyRef": {"name": "auditrelay-azure", "key": "client-secret"}}
    env = Rendered.env(rendered.container("fluent-bit"))
    assert expected == env["AUDITRELAY_AZURE_CLIENT_SECRET"]
    assert [] == rendered.all("Secret")


def test_client_certificate_is_mounted_into_the_sidecar(render: Render) -> None:
    """With clientCertificate auth the Secret's PEM file is mounted read-only into the sidecar,
    which reads it, and the output points at it."""
    rendered = render(ci_file("client-certificate-values"))
    mount = Rendered.mounts(rendered.container("sidecar"))["/etc/auditrelay/client-certificate"]
    assert {"name": "client-certificate", "readOnly": True} == {
        key: mount[key] for key in ("name", "readOnly")
    }
    assert "auditrelay-azure-cert" == rendered.volume("client-certificate")["secret"]["secretName"]
    output = rendered.section("OUTPUT", "auditrelay")
    assert "/etc/auditrelay/client-certificate/client.pem" == output["client_certificate"]


def test_no_configmap_holds_a_secret(render: Render, ci_values: Path) -> None:
    """No ConfigMap carries a secret: client_secret, where present, is only an environment
    reference, and the chart renders no Secret at all."""
    rendered = render(ci_values)
    assert [] == rendered.all("Secret")
    for config_map in rendered.all("ConfigMap"):
        for name, text in config_map["data"].items():
            for _, properties in parse_classic(text) if name.endswith(".conf") else []:
                value = properties.get("client_secret")
                assert value is None or value.startswith("${"), (name, value)


def test_a_secret_cannot_be_given_as_a_value(render: Render) -> None:
    """The schema has no place for the secret itself: a client secret given as a value is refused."""
    with pytest.raises(RenderError, match="additional properties 'value' not allowed"):
        render(
            ci_file("client-secret-values"),
            set_values={"azure.auth.clientSecret.value": "hunter2"},
        )


def test_own_policy_comes_from_a_configmap(render: Render) -> None:
    """With azure.policy.existingConfigMap the sidecar reads the operator's policy from that
    ConfigMap; without it the output sets no policy, so the bundled Defender policy applies."""
    rendered = render(ci_file("existing-policy-values"))
    volume = rendered.volume("policy")["configMap"]
    assert "my-audit-policy" == volume["name"]
    mount = Rendered.mounts(rendered.container("sidecar"))["/etc/auditrelay/policy"]
    assert ("policy", True) == (mount["name"], mount["readOnly"])
    output = rendered.section("OUTPUT", "auditrelay")
    assert "/etc/auditrelay/policy/policy.yaml" == output["policy"]
    assert "policy" not in render(ci_file("default-values")).section("OUTPUT", "auditrelay")


@pytest.mark.parametrize(
    ("distro", "path"),
    [
        ("kubeadm", "/var/log/kubernetes/audit/audit.log"),
        ("openshift", "/var/log/kube-apiserver/audit.log"),
        ("rke2", "/var/lib/rancher/rke2/server/logs/audit.log"),
        ("k3s", "/var/lib/rancher/k3s/server/logs/audit.log"),
        ("aksEngine", "/var/log/kubeaudit/audit.log"),
    ],
)
def test_each_distro_tails_its_audit_log_read_only(render: Render, distro: str, path: str) -> None:
    """auditLog.distro picks the distribution's audit log: the tail input reads that exact file,
    and its directory on the node is mounted read-only at the same path."""
    rendered = render(ci_file("default-values"), set_values={"auditLog.distro": distro})
    assert path == rendered.section("INPUT", "tail")["path"]
    directory = path.rsplit("/", 1)[0]
    assert {"path": directory, "type": "Directory"} == rendered.volume("audit-log")["hostPath"]
    mount = Rendered.mounts(rendered.container("fluent-bit"))[directory]
    assert ("audit-log", True) == (mount["name"], mount["readOnly"])


def test_audit_log_path_overrides_the_distro(render: Render) -> None:
    """auditLog.path wins over the distro's default."""
    rendered = render(ci_file("existing-policy-values"))
    assert "/var/log/k3s-audit/audit.log" == rendered.section("INPUT", "tail")["path"]
    assert "/var/log/k3s-audit" == rendered.volume("audit-log")["hostPath"]["path"]


def test_offsets_buffer_and_spool_live_on_the_node(render: Render, ci_values: Path) -> None:
    """The tail DB, Fluent Bit's filesystem buffer and the sidecar's spool are on the node's
    stateHostPath, so a restarted pod resumes where it stopped and loses nothing."""
    rendered = render(ci_values)
    state = rendered.volume("state")["hostPath"]
    assert {"path": "/var/lib/auditrelay", "type": "DirectoryOrCreate"} == state
    fluent_bit_state = Rendered.mounts(rendered.container("fluent-bit"))["/var/fluent-bit/state"]
    assert ("state", "fluent-bit") == (fluent_bit_state["name"], fluent_bit_state["subPath"])
    assert rendered.section("INPUT", "tail")["db"].startswith("/var/fluent-bit/state/")
    assert "filesystem" == rendered.section("INPUT", "tail")["storage.type"]
    assert rendered.section("SERVICE")["storage.path"].startswith("/var/fluent-bit/state/")
    sidecar = rendered.container("sidecar")
    spool_dir = Rendered.env(sidecar)["AUDITRELAY_STATE_DIR"]
    assert ("state", "sidecar") == (
        Rendered.mounts(sidecar)[spool_dir]["name"],
        Rendered.mounts(sidecar)[spool_dir]["subPath"],
    )


def test_spool_directory_belongs_to_the_sidecar_user(render: Render) -> None:
    """The one root step, with only CHOWN and FOWNER, creates the spool directory on the node for
    the sidecar's user and group, mode 0700."""
    rendered = render(ci_file("default-values"))
    prepare = rendered.container("prepare-state")
    sidecar = rendered.container("sidecar")["securityContext"]
    owner, group = str(sidecar["runAsUser"]), str(sidecar["runAsGroup"])
    expected = ["install", "-d", "-o", owner, "-g", group, "-m", "0700", "/state/sidecar"]
    assert expected == prepare["command"]
    assert {"drop": ["ALL"], "add": ["CHOWN", "FOWNER"]} == prepare["securityContext"][
        "capabilities"
    ]
    assert "state" == Rendered.mounts(prepare)["/state"]["name"]


def test_probes_watch_both_containers(render: Render, ci_values: Path) -> None:
    """The sidecar is probed on /healthz and /readyz at the port it serves on all addresses; Fluent
    Bit on its HTTP server, whose port is the one the configuration opens."""
    rendered = render(ci_values)
    sidecar, fluent_bit = rendered.container("sidecar"), rendered.container("fluent-bit")
    ports = {port["name"]: port["containerPort"] for port in sidecar["ports"] + fluent_bit["ports"]}
    assert f"0.0.0.0:{ports['sidecar-http']}" == Rendered.env(sidecar)["AUDITRELAY_METRICS_ADDRESS"]
    assert ("/healthz", "sidecar-http") == (
        sidecar["livenessProbe"]["httpGet"]["path"],
        sidecar["livenessProbe"]["httpGet"]["port"],
    )
    assert ("/readyz", "sidecar-http") == (
        sidecar["readinessProbe"]["httpGet"]["path"],
        sidecar["readinessProbe"]["httpGet"]["port"],
    )
    service = rendered.section("SERVICE")
    assert (str(ports["http"]), "0.0.0.0", "On") == (
        service["http_port"],
        service["http_listen"],
        service["http_server"],
    )
    # The health endpoint exists only with Health_Check On (off for hot reload before 5.0).
    health_path = {"On": "/api/v1/health", "Off": "/api/v1/uptime"}[service["health_check"]]
    assert health_path == fluent_bit["readinessProbe"]["httpGet"]["path"]
    assert "http" == fluent_bit["livenessProbe"]["httpGet"]["port"]


def test_least_privilege_security_contexts(render: Render, ci_values: Path) -> None:
    """Every chart container drops all capabilities, cannot escalate and has a read-only root
    filesystem; the sidecar and the plugin copy run as non-root; only the spool preparation adds
    capabilities (CHOWN, FOWNER); nothing is privileged."""
    rendered = render(ci_values)
    chart_containers = ["install-plugin", "prepare-state", "fluent-bit", "sidecar"]
    for name in chart_containers:
        context = rendered.container(name)["securityContext"]
        assert ["ALL"] == context["capabilities"]["drop"], name
        assert (False, True) == (
            context["allowPrivilegeEscalation"],
            context["readOnlyRootFilesystem"],
        ), name
        assert not context.get("privileged", False), name
        if name != "prepare-state":
            assert "add" not in context["capabilities"], name
    for name in ("install-plugin", "sidecar"):
        context = rendered.container(name)["securityContext"]
        assert (True, 10001) == (context["runAsNonRoot"], context["runAsUser"]), name
    assert "RuntimeDefault" == rendered.pod["securityContext"]["seccompProfile"]["type"]


def test_no_rbac_and_no_api_token(render: Render, ci_values: Path) -> None:
    """The pods call no Kubernetes API: no Role or binding is rendered and no API token is
    mounted (the audit-logging setup's own RBAC is tested in test_chart_audit_setup.py)."""
    rendered = render(ci_values, set_values={"auditSetup.enabled": "false"})
    for kind in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"):
        assert [] == rendered.all(kind)
    assert rendered.pod["automountServiceAccountToken"] is False


def test_runs_on_control_plane_nodes(render: Render) -> None:
    """By default the pods tolerate the control-plane taints and require a control-plane node."""
    rendered = render(ci_file("default-values"))
    tolerated = {toleration["key"] for toleration in rendered.pod["tolerations"]}
    assert {"node-role.kubernetes.io/control-plane", "node-role.kubernetes.io/master"} == tolerated
    terms = rendered.pod["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    keys = {term["matchExpressions"][0]["key"] for term in terms["nodeSelectorTerms"]}
    assert {"node-role.kubernetes.io/control-plane", "node-role.kubernetes.io/master"} == keys


def test_helm_test_checks_the_sidecar_readiness(render: Render) -> None:
    """`helm test` runs a pod that asks the sidecar's /readyz through the Service's port."""
    rendered = render(ci_file("default-values"))
    pods = rendered.all("Pod")
    assert 1 == len(pods)
    assert "test" == pods[0]["metadata"]["annotations"]["helm.sh/hook"]
    url = pods[0]["spec"]["containers"][0]["command"][-1]
    assert f"http://{FULLNAME}.{NAMESPACE}.svc:2021/readyz" == url
    ports = {port["name"]: port["port"] for port in rendered.one("Service")["spec"]["ports"]}
    assert {"http": 2020, "sidecar-http": 2021} == ports


def test_service_monitor_scrapes_the_sidecar_and_fluent_bit(render: Render) -> None:
    """The ServiceMonitor scrapes the sidecar's /metrics and Fluent Bit's Prometheus endpoint."""
    monitor = render(ci_file("rke2-values")).one("ServiceMonitor")
    endpoints = {(item["port"], item["path"]) for item in monitor["spec"]["endpoints"]}
    assert {("sidecar-http", "/metrics"), ("http", "/api/v2/metrics/prometheus")} == endpoints
    assert "kube-prometheus-stack" == monitor["metadata"]["labels"]["release"]


def test_hot_reload_reloads_fluent_bit_on_a_config_change(render: Render) -> None:
    """With hotReload.enabled Fluent Bit starts with --enable-hot-reload, a reloader watching the
    configuration posts to its reload endpoint, and the pods no longer roll on a config change."""
    rendered = render(ci_file("rke2-values"))
    assert "--enable-hot-reload" in rendered.container("fluent-bit")["args"]
    reloader = rendered.container("reloader")
    assert "--webhook-url=http://localhost:2020/api/v2/reload" in reloader["args"]
    assert "config" == Rendered.mounts(reloader)["/watch/config"]["name"]
    assert "checksum/config" not in (rendered.pod_metadata.get("annotations") or {})
    assert "checksum/config" in render(ci_file("default-values")).pod_metadata["annotations"]


def test_openshift_scc_is_granted_to_the_service_account_alone(render: Render) -> None:
    """On OpenShift the chart's SCC allows hostPath volumes, is granted to the chart's service
    account only, and the pods get the SELinux type that may read /var/log."""
    rendered = render(ci_file("openshift-values"))
    scc = rendered.one("SecurityContextConstraints")
    assert [f"system:serviceaccount:{NAMESPACE}:{FULLNAME}"] == scc["users"]
    assert (True, False, False) == (
        scc["allowHostDirVolumePlugin"],
        scc["allowPrivilegedContainer"],
        scc["allowPrivilegeEscalation"],
    )
    assert {"type": "spc_t"} == rendered.pod["securityContext"]["seLinuxOptions"]


def test_extra_containers_accept_a_template_string(render: Render) -> None:
    """extraContainers, given as a string as in the fluent-bit chart, is rendered into the pod."""
    rendered = render(ci_file("client-certificate-values"))
    assert "busybox:1.36" == rendered.container("debug-shell")["image"]


def test_schema_refuses_an_unknown_value(render: Render) -> None:
    """A misspelt value stops the install with the value's place, instead of being ignored."""
    with pytest.raises(
        RenderError, match="at '/sidecar': additional properties 'imagee' not allowed"
    ):
        render(ci_file("default-values"), set_values={"sidecar.imagee": "x"})


def test_schema_refuses_a_malformed_dcr_id(render: Render) -> None:
    """A DCR id that is not dcr- and 32 hex digits is refused before anything is installed."""
    with pytest.raises(RenderError, match="/azure/dcrId"):
        render(ci_file("default-values"), set_values={"azure.dcrId": "my-rule"})


def test_missing_endpoint_fails_with_what_to_set(render: Render) -> None:
    """Without azure.endpoint the chart refuses to render and says what to set."""
    with pytest.raises(RenderError, match=r"azure\.endpoint is required"):
        render()


def test_local_emulator_needs_no_azure_settings(render: Render) -> None:
    """azure.useLocalEmulator renders an output without endpoint, for a trial without Azure."""
    output = render(set_values={"azure.useLocalEmulator": "true"}).section("OUTPUT", "auditrelay")
    assert "endpoint" not in output
    assert "unix:///run/auditrelay/relay.sock" == output["sidecar_address"]


def test_global_values_of_a_parent_chart_are_accepted(render: Render) -> None:
    """The strict schema still lets a parent chart pass its global values down to this chart."""
    rendered = render(ci_file("default-values"), set_values={"global.imageRegistry": "example.org"})
    assert 1 == len(rendered.all("DaemonSet"))


def test_sidecar_starts_before_and_stops_after_fluent_bit(render: Render) -> None:
    """On Kubernetes 1.29+ the sidecar is a native sidecar placed after the chart's other init
    containers: it is up (its startup probe passed) before Fluent Bit starts, and it still takes
    Fluent Bit's last flush on shutdown."""
    pod = render(ci_file("default-values")).pod
    init_names = [item["name"] for item in pod["initContainers"]]
    assert ["install-plugin", "prepare-state", "sidecar"] == init_names
    sidecar = pod["initContainers"][-1]
    assert ("Always", "/healthz") == (
        sidecar["restartPolicy"],
        sidecar["startupProbe"]["httpGet"]["path"],
    )
    assert ["fluent-bit"] == [item["name"] for item in pod["containers"]]


def test_sidecar_is_a_regular_container_before_kubernetes_1_29(render: Render) -> None:
    """Clusters without native sidecars get the sidecar as a regular container."""
    pod = render(ci_file("default-values"), kube_version="1.28.9").pod
    assert ["install-plugin", "prepare-state"] == [item["name"] for item in pod["initContainers"]]
    assert ["fluent-bit", "sidecar"] == [item["name"] for item in pod["containers"]]
    assert "restartPolicy" not in pod["containers"][1]


def test_existing_configmap_replaces_the_chart_configuration(render: Render) -> None:
    """With existingConfigMap, Fluent Bit reads the operator's ConfigMap and the chart renders none."""
    rendered = render(ci_file("default-values"), set_values={"existingConfigMap": "my-fluent-bit"})
    assert [] == rendered.all("ConfigMap")
    assert "my-fluent-bit" == rendered.volume("config")["configMap"]["name"]


def test_hot_reload_before_fluent_bit_5_runs_without_the_health_check(render: Render) -> None:
    """Fluent Bit before 5.0 corrupts its heap on a reload with Health_Check on, so with
    hotReload.enabled on such an image the chart renders Health_Check Off and points the readiness
    probe at /api/v1/uptime (/api/v1/health exists only with the check), refuses a config.service
    that turns the check on, and says why; on 5.0+ images and without hot reload the check stays."""
    reloading = render(ci_file("rke2-values"))
    assert "Off" == reloading.section("SERVICE")["health_check"]
    probe = reloading.container("fluent-bit")["readinessProbe"]["httpGet"]
    assert "/api/v1/uptime" == probe["path"]
    for values, overrides in [
        ("rke2-values", {"image.tag": "5.1.1"}),
        ("default-values", {}),
    ]:
        rendered = render(ci_file(values), set_values=overrides)
        assert "On" == rendered.section("SERVICE")["health_check"]
        probe = rendered.container("fluent-bit")["readinessProbe"]["httpGet"]
        assert "/api/v1/health" == probe["path"]
    own_service = "[SERVICE]\n    HTTP_Server On\n    Health_Check On\n"
    with pytest.raises(RenderError, match=r"needs Health_Check Off .*mk_vhost_destroy"):
        render(ci_file("rke2-values"), set_values={"config.service": own_service})


def test_hot_reload_is_refused_with_a_worker_pool(render: Render) -> None:
    """Fluent Bit crashes on a hot reload when a Go plugin has workers, so the chart refuses
    hotReload.enabled unless every auditrelay output has Workers 0, and says why; with workers 0
    it renders, and the default (no hot reload) keeps Workers 1."""
    with pytest.raises(RenderError, match=r"hotReload\.enabled needs Workers 0 .*SIGSEGV"):
        render(ci_file("default-values"), set_values={"hotReload.enabled": "true"})
    own_outputs = "[OUTPUT]\n    Name auditrelay\n    Match *\n    workers 2\n"
    with pytest.raises(RenderError, match=r"hotReload\.enabled needs Workers 0"):
        render(
            ci_file("rke2-values"),
            set_values={"config.outputs": own_outputs},
        )
    reloading = render(ci_file("rke2-values")).section("OUTPUT", "auditrelay")
    assert "0" == reloading["workers"]
    assert "1" == render(ci_file("default-values")).section("OUTPUT", "auditrelay")["workers"]
