"""k3s and RKE2: audit settings in their ``config.yaml``.

- k3s runs kube-apiserver inside its own process and enables nothing by itself: the flags go
  into the ``kube-apiserver-arg`` list (``name=value`` entries), as k3s's hardening guide shows.
- RKE2 turns auditing on when ``audit-policy-file`` is set (or ``profile: cis``) and then adds
  the log path and rotation flags itself. When that policy file does not exist, RKE2 writes one
  with a single ``level: None`` rule: audit logging is "on" and records nothing.

Both files are edited as text (``yamledit``): the operator's comments and layout stay.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Final

import yaml

from auditrelay.audit import yamledit
from auditrelay.audit.errors import AuditSetupError
from auditrelay.audit.kubeadm import AuditFlags, AuditTarget, ManifestEdit, parse_flags

ARG_KEY: Final = "kube-apiserver-arg"


@dataclass(frozen=True, slots=True)
class Distribution:
    """Where a Rancher distribution keeps its config, policy, log and serving CA."""

    name: str
    config: Path
    target: AuditTarget
    server_ca: PurePosixPath
    restart_command: str


K3S: Final = Distribution(
    name="k3s",
    config=Path("/etc/rancher/k3s/config.yaml"),
    target=AuditTarget(
        policy_path=PurePosixPath("/var/lib/rancher/k3s/server/audit.yaml"),
        log_path=PurePosixPath("/var/lib/rancher/k3s/server/logs/audit.log"),
    ),
    server_ca=PurePosixPath("/var/lib/rancher/k3s/server/tls/server-ca.crt"),
    restart_command="systemctl restart k3s",
)
RKE2: Final = Distribution(
    name="rke2",
    config=Path("/etc/rancher/rke2/config.yaml"),
    target=AuditTarget(
        policy_path=PurePosixPath("/etc/rancher/rke2/audit-policy.yaml"),
        log_path=PurePosixPath("/var/lib/rancher/rke2/server/logs/audit.log"),
    ),
    server_ca=PurePosixPath("/var/lib/rancher/rke2/server/tls/server-ca.crt"),
    restart_command="systemctl restart rke2-server",
)
DISTRIBUTIONS: Final = {K3S.name: K3S, RKE2.name: RKE2}


@dataclass
class RancherConfig:
    """A k3s or RKE2 config file (absent or empty is a valid, empty config)."""

    distro: Distribution
    source: str
    text: str
    root: yaml.Node | None
    document: dict[str, Any]

    @property
    def exists(self) -> bool:
        return bool(self.text)

    @property
    def api_server_flags(self) -> dict[str, str]:
        raw = self.document.get(ARG_KEY) or []
        entries = [raw] if isinstance(raw, str) else [str(entry) for entry in raw]
        return parse_flags(entry if entry.startswith("--") else f"--{entry}" for entry in entries)

    @property
    def audit(self) -> AuditFlags:
        flags = dict(self.api_server_flags)
        if self.distro is RKE2 and (self.document.get("audit-policy-file") or self.cis_profile):
            flags.setdefault(
                "audit-policy-file",
                str(self.document.get("audit-policy-file") or self.distro.target.policy_path),
            )
            flags.setdefault("audit-log-path", str(self.distro.target.log_path))
            flags.setdefault("audit-log-maxage", "30")
            flags.setdefault("audit-log-maxbackup", "10")
            flags.setdefault("audit-log-maxsize", "100")
        return AuditFlags.from_flags(flags)

    @property
    def cis_profile(self) -> bool:
        return str(self.document.get("profile", "")).startswith("cis")


def read_config(distro: Distribution, path: Path) -> RancherConfig:
    """The config at ``path``; a missing file is an empty config (both start without one)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        text = ""
    except (OSError, UnicodeDecodeError) as error:
        raise AuditSetupError(f"{path}: cannot read the config file: {error}") from error
    root = yamledit.compose(text, str(path)) if text.strip() and _has_content(text) else None
    document = yaml.safe_load(text) if root is not None else {}
    if not isinstance(document, dict):
        raise AuditSetupError(f"{path}: expected a mapping of flag names to values")
    raw = document.get(ARG_KEY)
    if raw is not None and not isinstance(raw, (str, list)):
        raise AuditSetupError(f"{path}: {ARG_KEY}: expected a list of name=value strings")
    return RancherConfig(distro, str(path), text, root, document)


def _has_content(text: str) -> bool:
    return any(line.strip() and not line.lstrip().startswith("#") for line in text.splitlines())


def plan_enable(config: RancherConfig) -> ManifestEdit:
    """The config with auditing on: RKE2 gets ``audit-policy-file``; k3s the flags."""
    expected = dict(config.document)
    if config.distro is RKE2:
        value = str(config.distro.target.policy_path)
        expected["audit-policy-file"] = value
        text = _append(config.text, f"audit-policy-file: {yamledit.scalar(value)}\n")
        return _checked(config, text, expected, [f"added audit-policy-file: {value}"])
    present = config.api_server_flags
    entries = [
        f"{name}={value}"
        for name, value in config.distro.target.flags().items()
        if name not in present
    ]
    changes = [f"added {ARG_KEY} {entry}" for entry in entries]
    expected[ARG_KEY] = [*(config.document.get(ARG_KEY) or []), *entries]
    existing = yamledit.get(config.root, ARG_KEY) if config.root is not None else None
    if existing is None:
        text = _append(config.text, f"{ARG_KEY}:\n" + yamledit.sequence_block(entries))
        return _checked(config, text, expected, changes)
    if not isinstance(existing, yaml.SequenceNode) or not existing.value:
        raise AuditSetupError(
            f"{config.source}:{yamledit.line_of(existing)}: {ARG_KEY}: expected a non-empty list "
            "to add to; make it a list (one name=value per item) or edit by hand"
        )
    insertion = yamledit.append_to_sequence(config.text, existing, entries, config.source)
    return _checked(config, yamledit.apply(config.text, [insertion]), expected, changes)


def _append(text: str, lines: str) -> str:
    """Top-level keys go at the end of the file, after the operator's own."""
    return text + ("" if not text or text.endswith("\n") else "\n") + lines


def _checked(
    config: RancherConfig, text: str, expected: dict[str, Any], changes: list[str]
) -> ManifestEdit:
    """The edited text must read back as the original settings plus exactly the planned ones."""
    try:
        actual = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise AuditSetupError(
            f"{config.source}: the edit would not be valid YAML: {error}"
        ) from error
    if actual != expected:
        raise AuditSetupError(
            f"{config.source}: the file's layout defeats a byte-preserving edit; nothing written, "
            "add the audit settings by hand (docs/helm.md)"
        )
    return ManifestEdit(text, tuple(changes))
