"""What a node's audit configuration is: on, off, on but with gaps, or cannot tell.

The verdict on the node's policy is ``auditrelay policy verify``'s: the same probe requests
put to the node's policy and to the required one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from auditrelay.audit.kubeadm import AuditFlags
from auditrelay.audit.node import NodeSetup
from auditrelay.policy import compile_policy, load_policy
from auditrelay.policy_verify import verify


def assess(setup: NodeSetup, required: Path) -> dict[str, Any]:
    """The node's audit state: on / off / on-but-gaps / cannot-tell, with what shows it."""
    flags = setup.audit_flags()
    report: dict[str, Any] = {
        "distro": setup.distro,
        "file": str(setup.target),
        "audit": flags.to_json(),
        "problems": [],
        "missing": [],
    }
    if not flags.on:
        report["state"] = "off"
        report["problems"] = _off_reasons(flags)
        return report
    problems: list[str] = report["problems"]
    if flags.log_format != "json":
        problems.append(f"--audit-log-format={flags.log_format}: Fluent Bit's parser needs json")
    if setup.log_on_host(flags) is None:
        problems.append(f"--audit-log-path={flags.log_path} is not on a hostPath volume")
    policy = setup.policy_on_host(flags)
    report["state"] = "on"
    if policy is None or not policy.is_file():
        where = policy or flags.policy_file
        if setup.distro == "rke2":
            report["rke2PolicyMissing"] = True
            problems.append(
                f"{where} does not exist: RKE2 writes a policy with one `level: None` rule "
                "there at start, which records nothing"
            )
            report["state"] = "on-but-gaps"
        else:
            problems.append(f"the policy file {where} does not exist on the node")
            report["state"] = "cannot-tell"
        return report
    report["policyOnNode"] = str(policy)
    cluster = compile_policy(load_policy(policy))
    probes, shortfalls = verify(cluster, compile_policy(load_policy(required)))
    report["requestsChecked"] = len(probes)
    report["missing"] = [found.to_json() for found in shortfalls]
    if _records_nothing(cluster.policy.rules):
        problems.append(f"{policy} has only `level: None` rules: it records nothing")
    if shortfalls or problems:
        report["state"] = "on-but-gaps"
    return report


def _records_nothing(rules: Any) -> bool:
    return all(rule.level.text == "None" for rule in rules)


def _off_reasons(flags: AuditFlags) -> list[str]:
    reasons = []
    if not flags.policy_file:
        reasons.append("--audit-policy-file is not set: nothing is audited")
    if not flags.log_path:
        reasons.append("--audit-log-path is not set: no log file is written")
    elif flags.log_path == "-":
        reasons.append("--audit-log-path=- writes to stdout, not to a file Fluent Bit can tail")
    return reasons
