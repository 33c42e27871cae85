"""Atomic replacement and the per-node lock of ``auditrelay audit``."""

from __future__ import annotations

import multiprocessing
import os
from multiprocessing.synchronize import Event
from pathlib import Path

import pytest
from auditrelay.audit.errors import LockBusyError
from auditrelay.audit.files import atomic_write, node_lock, temporary_name


def test_atomic_write_keeps_mode_and_replaces_whole(tmp_path: Path) -> None:
    """The new bytes replace the old in one rename; the file's mode stays as it was."""
    target = tmp_path / "kube-apiserver.yaml"
    target.write_bytes(b"old\n")
    target.chmod(0o644)

    atomic_write(target, b"new\n")

    assert (b"new\n", 0o644) == (target.read_bytes(), target.stat().st_mode & 0o777)
    assert [target] == list(tmp_path.iterdir())


def test_crash_before_rename_leaves_the_original(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process killed after writing the temporary file but before the rename leaves the
    original whole; the temporary file is a dot-file, which the kubelet never runs."""
    target = tmp_path / "kube-apiserver.yaml"
    target.write_bytes(b"original\n")

    def killed(source: object, destination: object) -> None:
        raise KeyboardInterrupt  # what SIGINT does at this point

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, b"half-way\n")

    assert b"original\n" == target.read_bytes()
    assert not temporary_name(target).exists()
    assert temporary_name(target).name.startswith(".")


def _hold_lock(directory: str, held: Event, release: Event) -> None:
    with node_lock(Path(directory), wait_seconds=0):
        held.set()
        release.wait(30)


def test_second_run_refuses_while_the_first_holds_the_lock(tmp_path: Path) -> None:
    """Two runs on one node: the second is refused, naming the holder's pid, and gets the lock
    once the first is gone."""
    context = multiprocessing.get_context("spawn")
    held, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_lock, args=(str(tmp_path), held, release))
    holder.start()
    try:
        assert held.wait(30)
        with pytest.raises(LockBusyError, match=f"pid {holder.pid}"), node_lock(tmp_path, 0.3):
            pass
    finally:
        release.set()
        holder.join(30)
    with node_lock(tmp_path, wait_seconds=5):
        pass
