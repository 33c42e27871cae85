"""kubeadm: audit flags and hostPath mounts in the kube-apiserver static pod manifest, and the
same settings in the ``kubeadm-config`` ClusterConfiguration so ``kubeadm upgrade`` keeps them.

The manifest is edited as text (``yamledit``): kubeadm's layout, any comments and every other
byte stay as they were. The result is parsed again and must equal the original document plus
exactly the planned additions, or nothing is written.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Final

import yaml

from auditrelay.audit import yamledit
from auditrelay.audit.errors import AuditSetupError

DEFAULT_MANIFEST: Final = Path("/etc/kubernetes/manifests/kube-apiserver.yaml")
POLICY_ANNOTATION: Final = "auditrelay.io/audit-policy-sha256"
AUDIT_FLAG_NAMES: Final = (
    "audit-policy-file",
    "audit-log-path",
    "audit-log-format",
    "audit-log-maxage",
    "audit-log-maxbackup",
    "audit-log-maxsize",
)


@dataclass(frozen=True, slots=True)
class AuditTarget:
    """Where audit logging goes when it is turned on: host paths, and rotation."""

    policy_path: PurePosixPath
    log_path: PurePosixPath
    max_age_days: int = 30
    max_backups: int = 10
    max_size_mb: int = 100

    def flags(self) -> dict[str, str]:
        return {
            "audit-policy-file": str(self.policy_path),
            "audit-log-path": str(self.log_path),
            "audit-log-format": "json",
            "audit-log-maxage": str(self.max_age_days),
            "audit-log-maxbackup": str(self.max_backups),
            "audit-log-maxsize": str(self.max_size_mb),
        }


KUBEADM_TARGET: Final = AuditTarget(
    policy_path=PurePosixPath("/etc/kubernetes/audit/policy.yaml"),
    log_path=PurePosixPath("/var/log/kubernetes/audit/audit.log"),
)


@dataclass(frozen=True, slots=True)
class AuditFlags:
    """The audit settings an API server runs with (None: the flag is not set)."""

    policy_file: str | None
    log_path: str | None
    log_format: str
    max_age: str | None = None
    max_backup: str | None = None
    max_size: str | None = None

    @property
    def on(self) -> bool:
        """Events are written to a file: a policy (without one nothing is audited) and a path."""
        return bool(self.policy_file) and bool(self.log_path) and self.log_path != "-"

    @classmethod
    def from_flags(cls, flags: dict[str, str]) -> AuditFlags:
        return cls(
            policy_file=flags.get("audit-policy-file") or None,
            log_path=flags.get("audit-log-path") or None,
            log_format=flags.get("audit-log-format", "json"),
            max_age=flags.get("audit-log-maxage"),
            max_backup=flags.get("audit-log-maxbackup"),
            max_size=flags.get("audit-log-maxsize"),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "policyFile": self.policy_file,
            "logPath": self.log_path,
            "logFormat": self.log_format,
            "logMaxAgeDays": self.max_age,
            "logMaxBackups": self.max_backup,
            "logMaxSizeMB": self.max_size,
        }


def parse_flags(words: Iterable[str]) -> dict[str, str]:
    """``--name=value`` and ``--name value`` words as a name -> value map (last one wins)."""
    flags: dict[str, str] = {}
    tokens = list(words)
    for index, token in enumerate(tokens):
        if not token.startswith("--"):
            continue
        name, equals, value = token[2:].partition("=")
        if not equals and index + 1 < len(tokens) and not tokens[index + 1].startswith("-"):
            value = tokens[index + 1]
        flags[name] = value
    return flags


@dataclass
class StaticPod:
    """A kube-apiserver static pod manifest: its text, its node tree and the parsed document."""

    source: str
    text: str
    root: yaml.Node
    document: dict[str, Any]
    container_index: int
    flags: dict[str, str] = field(default_factory=dict)

    @property
    def container(self) -> dict[str, Any]:
        containers: list[dict[str, Any]] = self.document["spec"]["containers"]
        return containers[self.container_index]

    @property
    def audit(self) -> AuditFlags:
        return AuditFlags.from_flags(self.flags)

    def host_path(self, container_path: str) -> PurePosixPath | None:
        """The node path a container path is mounted from, or None when no hostPath covers it."""
        wanted = PurePosixPath(container_path)
        host_volumes = {
            volume.get("name"): PurePosixPath(str(volume["hostPath"].get("path", "")))
            for volume in self.document["spec"].get("volumes") or ()
            if isinstance(volume, dict) and isinstance(volume.get("hostPath"), dict)
        }
        for mount in self.container.get("volumeMounts") or ():
            if not isinstance(mount, dict) or mount.get("name") not in host_volumes:
                continue
            mount_path = PurePosixPath(str(mount.get("mountPath", "")))
            if wanted == mount_path or mount_path in wanted.parents:
                return host_volumes[mount.get("name")] / wanted.relative_to(mount_path)
        return None


def read_static_pod(path: Path) -> StaticPod:
    """The manifest at ``path``; AuditSetupError saying what is wrong with it otherwise."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError as error:
        raise AuditSetupError(
            f"{path}: no such file (a kubeadm control-plane node has it)"
        ) from error
    except (OSError, UnicodeDecodeError) as error:
        raise AuditSetupError(f"{path}: cannot read the manifest: {error}") from error
    return parse_static_pod(text, str(path))


def parse_static_pod(text: str, source: str) -> StaticPod:
    root = yamledit.compose(text, source)
    document = yaml.safe_load(text)
    if not isinstance(document, dict) or document.get("kind") != "Pod":
        kind = document.get("kind") if isinstance(document, dict) else type(document).__name__
        raise AuditSetupError(f"{source}: kind: expected Pod (a static pod manifest), got {kind!r}")
    spec = document.get("spec")
    containers = spec.get("containers") if isinstance(spec, dict) else None
    if not isinstance(containers, list):
        raise AuditSetupError(f"{source}: spec.containers: expected a list of containers")
    for index, container in enumerate(containers):
        if isinstance(container, dict) and _is_apiserver(container):
            words = [
                str(w) for w in [*(container.get("command") or ()), *(container.get("args") or ())]
            ]
            return StaticPod(source, text, root, document, index, parse_flags(words))
    raise AuditSetupError(f"{source}: spec.containers: no kube-apiserver container")


def _is_apiserver(container: dict[str, Any]) -> bool:
    command = container.get("command") or ()
    return container.get("name") == "kube-apiserver" or any(
        str(word).rsplit("/", 1)[-1] == "kube-apiserver" for word in command[:1]
    )


@dataclass(frozen=True, slots=True)
class ManifestEdit:
    """The new manifest text and what changed, one sentence per change."""

    text: str
    changes: tuple[str, ...]


def plan_enable(pod: StaticPod, target: AuditTarget) -> ManifestEdit:
    """Adds the missing audit flags and the hostPath volumes they need; keeps the rest."""
    expected = copy.deepcopy(pod.document)
    container = expected["spec"]["containers"][pod.container_index]
    insertions: list[yamledit.Insertion] = []
    changes: list[str] = []

    new_flags = [
        f"--{name}={value}" for name, value in target.flags().items() if name not in pod.flags
    ]
    if new_flags:
        flag_key = "args" if container.get("args") else "command"
        container[flag_key] = [*container[flag_key], *new_flags]
        node = _container_node(pod, flag_key)
        insertions.append(yamledit.append_to_sequence(pod.text, node, new_flags, pod.source))
        changes += [f"added {flag} to {flag_key}" for flag in new_flags]

    mounts, volumes = _missing_volumes(pod, target)
    if mounts:
        container["volumeMounts"] = [*(container.get("volumeMounts") or []), *mounts]
        expected["spec"]["volumes"] = [*(expected["spec"].get("volumes") or []), *volumes]
        insertions += _volume_insertions(pod, mounts, volumes)
        changes += [
            f"added hostPath volume {volume['name']} ({volume['hostPath']['path']}, "
            f"{volume['hostPath']['type']})"
            for volume in volumes
        ]
    text = yamledit.apply(pod.text, insertions)
    _check_result(text, expected, pod.source)
    return ManifestEdit(text, tuple(changes))


def plan_policy_restart(pod: StaticPod, policy_sha256: str) -> ManifestEdit:
    """The manifest with the policy's checksum in an annotation: a changed pod makes the kubelet
    restart kube-apiserver, which reads its policy file only at start."""
    metadata = yamledit.get(pod.root, "metadata")
    annotations = yamledit.get(metadata, "annotations") if metadata is not None else None
    if annotations is None:
        raise AuditSetupError(f"{pod.source}: metadata.annotations: expected a mapping to add to")
    insertion = yamledit.set_scalar_key(
        pod.text, annotations, POLICY_ANNOTATION, policy_sha256, pod.source
    )
    expected = copy.deepcopy(pod.document)
    expected["metadata"]["annotations"][POLICY_ANNOTATION] = policy_sha256
    text = yamledit.apply(pod.text, [insertion])
    _check_result(text, expected, pod.source)
    return ManifestEdit(text, (f"set annotation {POLICY_ANNOTATION}: {policy_sha256}",))


def _missing_volumes(
    pod: StaticPod, target: AuditTarget
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    policy = pod.flags.get("audit-policy-file") or str(target.policy_path)
    log = pod.flags.get("audit-log-path") or str(target.log_path)
    taken = {str(volume.get("name")) for volume in pod.document["spec"].get("volumes") or ()}
    wanted = [
        ("audit-policy", policy, True, "File"),
        ("audit-log", str(PurePosixPath(log).parent), False, "DirectoryOrCreate"),
    ]
    mounts, volumes = [], []
    for name, path, read_only, path_type in wanted:
        if pod.host_path(path) is not None:
            continue
        unique = name if name not in taken else f"auditrelay-{name}"
        mount: dict[str, Any] = {"mountPath": path, "name": unique}
        if read_only:
            mount["readOnly"] = True
        mounts.append(mount)
        volumes.append({"hostPath": {"path": path, "type": path_type}, "name": unique})
    return mounts, volumes


def _volume_insertions(
    pod: StaticPod, mounts: list[dict[str, Any]], volumes: list[dict[str, Any]]
) -> list[yamledit.Insertion]:
    container_node = _nodes(pod)[1]
    spec_node = yamledit.get(pod.root, "spec")
    assert spec_node is not None  # parse_static_pod checked spec.containers
    found = []
    for parent, key, items in (
        (container_node, "volumeMounts", mounts),
        (spec_node, "volumes", volumes),
    ):
        existing = yamledit.get(parent, key)
        if isinstance(existing, yaml.SequenceNode) and existing.value:
            found.append(yamledit.append_to_sequence(pod.text, existing, items, pod.source))
        elif existing is None:
            block = yamledit.sequence_block(items)
            found.append(yamledit.add_key(pod.text, parent, key, block, pod.source))
        else:
            raise AuditSetupError(
                f"{pod.source}:{yamledit.line_of(existing)}: {key}: expected a list; edit by hand"
            )
    return found


def _nodes(pod: StaticPod) -> tuple[yaml.Node, yaml.Node]:
    spec = yamledit.get(pod.root, "spec")
    containers = yamledit.get(spec, "containers") if spec is not None else None
    if not isinstance(containers, yaml.SequenceNode):
        raise AuditSetupError(f"{pod.source}: spec.containers: expected a list")
    return containers, containers.value[pod.container_index]


def _container_node(pod: StaticPod, key: str) -> yaml.Node:
    node = yamledit.get(_nodes(pod)[1], key)
    if node is None:
        raise AuditSetupError(f"{pod.source}: the kube-apiserver container has no {key} list")
    return node


def _check_result(text: str, expected: dict[str, Any], source: str) -> None:
    """The edited text must read back as the original document plus the planned additions."""
    try:
        actual = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise AuditSetupError(f"{source}: the edit would not be valid YAML: {error}") from error
    if actual != expected:
        raise AuditSetupError(
            f"{source}: the manifest's layout defeats a byte-preserving edit; nothing written, "
            "add the audit flags by hand (docs/helm.md)"
        )


# ---------------------------------------------------------------------------------------------
# ClusterConfiguration (kubeadm-config ConfigMap)


def plan_cluster_configuration(text: str, source: str, target: AuditTarget) -> ManifestEdit:
    """The ClusterConfiguration with the audit flags in ``apiServer.extraArgs`` and the
    volumes in ``apiServer.extraVolumes``, in the document's own API version's shape: v1beta3
    ``extraArgs`` is a map, v1beta4 a list of ``{name, value}``. kubeadm re-serialises this
    document when it uploads it, so it is written whole rather than edited in place."""
    try:
        documents = list(yaml.safe_load_all(text))
    except yaml.YAMLError as error:
        raise AuditSetupError(
            f"{source}: not valid YAML: {' '.join(str(error).split())}"
        ) from error
    config = next(
        (d for d in documents if isinstance(d, dict) and d.get("kind") == "ClusterConfiguration"),
        None,
    )
    if config is None:
        raise AuditSetupError(f"{source}: no document of kind ClusterConfiguration")
    version = str(config.get("apiVersion", ""))
    if version not in ("kubeadm.k8s.io/v1beta3", "kubeadm.k8s.io/v1beta4"):
        raise AuditSetupError(
            f"{source}: apiVersion: expected kubeadm.k8s.io/v1beta3 or v1beta4, got {version!r}"
        )
    api_server = config.setdefault("apiServer", {}) or {}
    config["apiServer"] = api_server
    changes = _set_extra_args(api_server, target.flags(), list_shape=version.endswith("v1beta4"))
    changes += _add_extra_volumes(api_server, target)
    dumped = yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
    return ManifestEdit(dumped, tuple(changes))


def _set_extra_args(
    api_server: dict[str, Any], flags: dict[str, str], list_shape: bool
) -> list[str]:
    changes = []
    if list_shape:
        args = api_server.get("extraArgs") or []
        present = {str(arg.get("name")) for arg in args if isinstance(arg, dict)}
        for name, value in flags.items():
            if name not in present:
                args.append({"name": name, "value": value})
                changes.append(f"apiServer.extraArgs: added {name}={value}")
    else:
        args = api_server.get("extraArgs") or {}
        for name, value in flags.items():
            if name not in args:
                args[name] = value
                changes.append(f"apiServer.extraArgs: added {name}={value}")
    api_server["extraArgs"] = args
    return changes


def _add_extra_volumes(api_server: dict[str, Any], target: AuditTarget) -> list[str]:
    volumes = api_server.get("extraVolumes") or []
    present = {str(volume.get("name")) for volume in volumes if isinstance(volume, dict)}
    log_dir = str(target.log_path.parent)
    wanted = [
        {
            "name": "audit-policy",
            "hostPath": str(target.policy_path),
            "mountPath": str(target.policy_path),
            "readOnly": True,
            "pathType": "File",
        },
        {
            "name": "audit-log",
            "hostPath": log_dir,
            "mountPath": log_dir,
            "readOnly": False,
            "pathType": "DirectoryOrCreate",
        },
    ]
    changes = []
    for volume in wanted:
        if volume["name"] not in present:
            volumes.append(volume)
            changes.append(f"apiServer.extraVolumes: added {volume['name']} ({volume['hostPath']})")
    api_server["extraVolumes"] = volumes
    return changes
