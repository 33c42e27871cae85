"""``auditrelay policy verify|eval|filter``: what operators run against their own cluster."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
from auditrelay.cli import main
from auditrelay.policy import compile_policy, load_policy
from auditrelay.policy_verify import detection_probes, stages_of
from fixtures.chunks import AUDIT_LOG, DEFENDER_POLICY, sample_lines

REPO = Path(__file__).resolve().parents[2]
BUNDLED = REPO / "audit_policy.yaml"

HEADER = "apiVersion: audit.k8s.io/v1\nkind: Policy\n"
# What every audit event carries, and serve requires, besides the request's own fields.
EVENT = {
    "kind": "Event",
    "apiVersion": "audit.k8s.io/v1",
    "auditID": "0d6e4f43-d8a2-4b39-a9c2-3a4f4d0e6b11",
    "stage": "ResponseComplete",
    "level": "RequestResponse",
}


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _stdin(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))


# ---------------------------------------------------------------------------------------------
# The bundled policy against Defender's needs.


def test_bundled_policy_meets_every_detection_need() -> None:
    """audit_policy.yaml records each detection's request at its minimum level, in every stage
    Defender reads (ResponseComplete, and ResponseStarted for exec, attach, port-forward)."""
    policy = compile_policy(load_policy(BUNDLED))
    short = []
    for probe in detection_probes():
        decision = policy.evaluate(probe.request)
        needed = {"ResponseComplete", "ResponseStarted"} & set(stages_of(probe.request))
        if decision.level < probe.minimum or needed & decision.omit_stages:
            short.append(probe.name)

    assert [] == short


# ---------------------------------------------------------------------------------------------
# verify


def test_verify_same_policy_finds_nothing_missing(capsys: pytest.CaptureFixture[str]) -> None:
    """A cluster already running the required policy passes with exit status 0."""
    code = main(["policy", "verify", "--policy", str(BUNDLED)])

    assert (0, True) == (code, capsys.readouterr().out.endswith(" requires, 0 missing.\n"))


def test_verify_lists_defender_policy_gaps(capsys: pytest.CaptureFixture[str]) -> None:
    """Defender's original misses event deletecollection and coredns bodies: exit status 1."""
    code = main(["policy", "verify", "--policy", str(DEFENDER_POLICY), "--output", "json"])
    report = json.loads(capsys.readouterr().out)
    missing = {found["request"]: found["problem"] for found in report["missing"]}

    assert 1 == code
    assert "not recorded at all" == missing["events deleted as a collection"]
    assert "recorded at Metadata, RequestResponse required" == missing["coredns configmap updated"]


def test_verify_reports_omitted_stages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A policy that omits ResponseStarted loses the start of exec sessions: it is listed."""
    cluster = _write(
        tmp_path,
        "cluster.yaml",
        HEADER
        + "omitStages: [RequestReceived, ResponseStarted]\nrules:\n- level: RequestResponse\n",
    )
    code = main(["policy", "verify", "--policy", str(cluster)])
    table = capsys.readouterr().out
    exec_row = next(line for line in table.splitlines() if line.startswith("exec into a pod "))

    assert (1, True) == (code, exec_row.endswith("stage ResponseStarted omitted"))


def test_verify_table_names_each_missing_class(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A policy that logs only reads leaves every write class listed in the table."""
    cluster = _write(
        tmp_path, "reads.yaml", HEADER + "rules:\n- level: Metadata\n  verbs: [get, list, watch]\n"
    )
    code = main(["policy", "verify", "--policy", str(cluster)])
    table = capsys.readouterr().out

    assert 1 == code
    assert "cluster-admin binding created" in table
    assert "not recorded at all" in table


MANIFEST = """
apiVersion: v1
kind: Pod
metadata: {name: kube-apiserver, namespace: kube-system}
spec:
  containers:
  - name: kube-apiserver
    command:
    - kube-apiserver
    - --advertise-address=10.0.0.1
    FLAGS
    volumeMounts:
    - {name: audit-log, mountPath: /var/log/kubernetes/audit}
    - {name: audit-policy, mountPath: /etc/kubernetes/audit-policy.yaml, readOnly: true}
  volumes:
  - name: audit-log
    hostPath: {path: /var/log/kubernetes/audit, type: DirectoryOrCreate}
  - name: audit-policy
    hostPath: {path: /etc/kubernetes/audit-policy.yaml, type: File}
"""
GOOD_FLAGS = [
    "--audit-policy-file=/etc/kubernetes/audit-policy.yaml",
    "--audit-log-path=/var/log/kubernetes/audit/audit.log",
]


def _manifest(tmp_path: Path, flags: list[str]) -> Path:
    lines = "\n".join(f"    - {flag}" for flag in flags).lstrip()
    return _write(tmp_path, "kube-apiserver.yaml", MANIFEST.replace("FLAGS", lines or "- x"))


def _verify_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str]
) -> tuple[int, list[str]]:
    manifest = _manifest(tmp_path, flags)
    args = ["--policy", str(BUNDLED), "--manifest", str(manifest), "--output", "json"]
    code = main(["policy", "verify", *args])
    return code, json.loads(capsys.readouterr().out)["manifestProblems"]


def test_verify_manifest_with_audit_logging_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Policy file, a log file on a hostPath volume, JSON format: nothing to report."""
    assert (0, []) == _verify_manifest(tmp_path, capsys, GOOD_FLAGS)


@pytest.mark.parametrize(
    ("flags", "problem"),
    [
        ([], "audit logging is off: --audit-policy-file is not set"),
        (GOOD_FLAGS[:1], "no audit log file: --audit-log-path is not set"),
        (
            [*GOOD_FLAGS, "--audit-log-format=legacy"],
            "--audit-log-format=legacy: Fluent Bit's parser needs json",
        ),
        (
            [GOOD_FLAGS[0], "--audit-log-path=-"],
            "--audit-log-path=- writes to stdout; Fluent Bit needs a file to tail",
        ),
        (
            [GOOD_FLAGS[0], "--audit-log-path=/tmp/audit.log"],
            "--audit-log-path=/tmp/audit.log is not on a hostPath volume: "
            "Fluent Bit on the node cannot tail it",
        ),
    ],
    ids=["no policy", "no path", "legacy format", "stdout", "not on host"],
)
def test_verify_manifest_problems(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], problem: str
) -> None:
    """Each way audit logs can be out of Fluent Bit's reach is reported, with exit status 1."""
    code, problems = _verify_manifest(tmp_path, capsys, flags)

    assert (1, True) == (code, problem in problems)


def test_verify_manifest_without_apiserver_is_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A manifest that is not kube-apiserver's is bad input: exit status 2, file named."""
    manifest = _write(
        tmp_path, "other.yaml", "apiVersion: v1\nkind: Pod\nspec: {containers: [{name: x}]}\n"
    )
    code = main(["policy", "verify", "--policy", str(BUNDLED), "--manifest", str(manifest)])

    assert 2 == code
    assert f"{manifest}: no kube-apiserver container in spec.containers" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- level: None\n", "not an audit policy: expected a mapping"),
        ("apiVersion: v1\nkind: ConfigMap\ndata: {}\n", "not an audit policy: apiVersion 'v1'"),
        (
            HEADER + "rules:\n- level: Everything\n",
            "rules[0].level: unsupported value 'Everything'",
        ),
        (
            HEADER
            + "rules:\n- level: None\n  resources: [{group: ''}]\n  nonResourceURLs: [/healthz]\n",
            "rules[0].nonResourceURLs: rules cannot apply to both",
        ),
        (
            HEADER + "rules:\n- level: Metadata\n- level: None\n  nonResourceURLs: [healthz]\n",
            "rules[1].nonResourceURLs[0]: 'healthz': non-resource URL rules must begin with a '/'",
        ),
    ],
    ids=["not a policy", "other kind", "unknown level", "resources and URLs", "URL without slash"],
)
@pytest.mark.parametrize("command", ["verify", "eval", "filter"])
def test_bad_policy_is_bad_input(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: str,
    text: str,
    message: str,
) -> None:
    """Every command refuses a bad policy file with exit status 2, naming file and field."""
    policy = _write(tmp_path, "cluster.yaml", text)
    _stdin(monkeypatch, "")
    code = main(["policy", command, "--policy", str(policy)])
    error = capsys.readouterr().err

    assert 2 == code
    assert f"{policy}: " in error
    assert message in error


# ---------------------------------------------------------------------------------------------
# eval


def test_eval_answers_each_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """One JSON answer per input line: level, stages, managed fields and the deciding rule."""
    _stdin(
        monkeypatch,
        '{"user": "alice", "groups": ["system:authenticated"], "verb": "create",'
        ' "namespace": "default", "resource": "pods", "subresource": "exec", "name": "web",'
        ' "resourceRequest": true}\n'
        '{"user": null, "verb": "get", "path": "/healthz"}\n'
        '{"user": "bob", "verb": "delete", "resource": "events", "apiGroup": "events.k8s.io",'
        ' "resourceRequest": true}\n',
    )
    code = main(["policy", "eval", "--policy", str(BUNDLED)])
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    assert 0 == code
    assert [
        {
            "level": "Metadata",
            "omitStages": ["RequestReceived"],
            "omitManagedFields": True,
            "rule": 12,
        },
        {"level": "None", "omitStages": ["RequestReceived"], "omitManagedFields": True, "rule": 0},
        {
            "level": "Metadata",
            "omitStages": ["RequestReceived"],
            "omitManagedFields": True,
            "rule": 7,
        },
    ] == answers


def test_eval_reports_bad_lines_and_goes_on(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A line that is not JSON (or has a wrong type) gets an error answer; exit status 2."""
    _stdin(monkeypatch, 'not json\n{"verb": 3}\n{"verb": "get", "path": "/x"}\n')
    code = main(["policy", "eval", "--policy", str(DEFENDER_POLICY)])
    captured = capsys.readouterr()
    answers = [json.loads(line) for line in captured.out.splitlines()]

    assert 2 == code
    assert ["line 1", "line 2", None] == [a.get("error", "")[:6] or None for a in answers]
    assert "stdin line 2: 'verb' must be a string or null" in captured.err


def test_eval_table(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """--output text shows one readable row per request."""
    _stdin(
        monkeypatch,
        '{"user": "alice", "verb": "list", "resource": "secrets", "resourceRequest": true}\n',
    )
    code = main(["policy", "eval", "--policy", str(BUNDLED), "--output", "text"])
    rows = capsys.readouterr().out.splitlines()

    assert (0, ["LINE", "LEVEL", "OMIT", "STAGES", "OMIT", "MANAGED", "FIELDS", "RULE"]) == (
        code,
        rows[0].split(),
    )
    assert ["1", "Metadata", "RequestReceived", "yes", "11"] == rows[1].split()


# ---------------------------------------------------------------------------------------------
# filter


def test_filter_real_logs_writes_kept_events_and_counts(capsys: pytest.CaptureFixture[str]) -> None:
    """Kept events go to stdout as JSON lines; counts and bytes in and out go to stderr."""
    code = main(["policy", "filter", "--policy", str(BUNDLED), "--output", "json", str(AUDIT_LOG)])
    captured = capsys.readouterr()
    shipped = [json.loads(line) for line in captured.out.splitlines()]
    summary = json.loads(captured.err.splitlines()[-1])
    lines_in = len(sample_lines())
    set_aside = [line for line in captured.err.splitlines() if "not an audit event" in line]

    assert 0 == code  # every line kube-apiserver wrote is an audit event
    assert (lines_in, len(shipped)) == (
        summary["eventsIn"] + summary["badLines"],
        summary["eventsOut"],
    )
    assert len(set_aside) == summary["badLines"]
    assert all(event["apiVersion"].startswith("audit.k8s.io/") for event in shipped)
    assert summary["eventsIn"] == summary["eventsOut"] + summary["eventsDropped"]
    assert len(captured.out.encode()) == summary["bytesOut"]
    renewals = [
        event
        for event in shipped
        if event.get("objectRef", {}).get("resource") == "leases"
        and event["verb"] in ("get", "update", "patch")
    ]
    assert [] == renewals


def test_filter_reports_non_json_line_with_its_number(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A line that is not JSON is reported as FILE:LINE; the events around it still go out."""
    event = {
        **EVENT,
        "verb": "create",
        "user": {"username": "alice"},
        "objectRef": {"resource": "pods"},
    }
    log = _write(tmp_path, "audit.log", f"{json.dumps(event)}\n{{torn\n{json.dumps(event)}\n")
    code = main(["policy", "filter", "--policy", str(BUNDLED), str(log)])
    captured = capsys.readouterr()

    assert 2 == code
    assert 2 == len(captured.out.splitlines())
    assert f"{log}:2: not JSON" in captured.err


def test_filter_event_without_object_ref(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An event without objectRef is decided as a non-resource request, not a crash."""
    _stdin(
        monkeypatch,
        json.dumps({**EVENT, "verb": "get", "requestURI": "/logs/x", "user": {"username": "a"}})
        + "\n",
    )
    code = main(["policy", "filter", "--policy", str(BUNDLED)])
    captured = capsys.readouterr()

    assert (0, "/logs/x") == (code, json.loads(captured.out)["requestURI"])
    assert "out" in captured.err


def test_filter_sets_aside_what_serve_sets_aside(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One rule for the preview and for serve: an event without apiVersion (or of another
    kind, or without auditID) is reported with its reason and not written, exit 2; the event
    beside it goes out."""
    good = {**EVENT, "verb": "create", "objectRef": {"resource": "pods"}}
    no_version = {key: value for key, value in good.items() if key != "apiVersion"}
    no_id = {key: value for key, value in good.items() if key != "auditID"}
    lines = [json.dumps(event) for event in (no_version, good, no_id)]
    log = _write(tmp_path, "audit.log", "\n".join(lines) + "\n")

    code = main(["policy", "filter", "--policy", str(BUNDLED), str(log)])

    captured = capsys.readouterr()
    assert 2 == code
    assert [good["auditID"]] == [json.loads(line)["auditID"] for line in captured.out.splitlines()]
    assert f"{log}:1: not an audit event serve would ship (unsupported_api_version" in captured.err
    assert f"{log}:3: not an audit event serve would ship (missing_audit_id" in captured.err


def test_filter_missing_file_is_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A log file that does not exist is named, with exit status 2."""
    code = main(["policy", "filter", "--policy", str(BUNDLED), str(tmp_path / "none.log")])

    assert (2, True) == (code, "none.log: no such file" in capsys.readouterr().err)
