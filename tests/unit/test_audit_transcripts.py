"""The ``auditrelay audit`` transcripts in README.md, docs/audit-logging.md and docs/helm.md are
what the commands print now (tests/audit/transcripts.py made them; rerun it after a change)."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from audit import transcripts

CONTROLPLANE = ("kubeadm-online", "openshift")


@functools.cache
def _fresh(name: str) -> str:
    return transcripts.OFFLINE[name]()


@pytest.mark.parametrize("page", transcripts.PAGES, ids=lambda page: page.name)
def test_offline_transcripts_are_what_the_commands_print(page: Path) -> None:
    """Each offline transcript a page shows equals a fresh run of its commands on a copy of
    the committed node files (the time of a rollback aside)."""
    shown = transcripts.shown(page)

    for name, body in shown.items():
        if name in CONTROLPLANE:
            continue
        fresh = _fresh(name)
        assert transcripts.normalized(fresh) == transcripts.normalized(body), (
            f"{page.name}: transcript {name} is stale: python3 tests/audit/transcripts.py"
        )


def test_every_transcript_is_shown_and_filled() -> None:
    """Each transcript appears on some page, none is left empty (the control-plane ones are
    made with --controlplane), and each distribution's commands are on README.md and
    docs/helm.md."""
    shown = {page.name: transcripts.shown(page) for page in transcripts.PAGES}
    everywhere = {name: body for found in shown.values() for name, body in found.items()}

    assert set(transcripts.OFFLINE) | set(CONTROLPLANE) == set(everywhere)
    assert all("(exit status " in body for body in everywhere.values())
    for page, wanted in (
        ("README.md", {"short-kubeadm", "short-k3s", "short-rke2", "openshift"}),
        ("helm.md", {"job-kubeadm", "job-k3s", "job-rke2", "openshift"}),
    ):
        assert wanted <= set(shown[page])
        for name in wanted:
            assert all(
                f"$ auditrelay audit {c}" in shown[page][name]
                for c in ("status", "enable", "rollback")
            )
