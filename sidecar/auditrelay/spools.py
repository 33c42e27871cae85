"""The spools under ``<state_dir>/spool/``: whose each one is, and what to do with one nobody owns.

A pipeline's spool is ``spool/<pipeline id>/``, and the id is the output instance and the
destination (``config.DESTINATION_PROPERTIES``), so credentials, tuning and the policy can change
and the backlog stays. Beside the segments each spool keeps ``destination.json``: the id, the
instance and the destination (never a secret), so that a spool whose pipeline is gone (its
``dcr_id`` changed, say) can still be described.

A spool is *orphaned* when no configured pipeline owns it. ``move_pending`` hands its pending
rows, in order, to another pipeline's spool: each batch is appended there durably before it is
acknowledged here, so a crash in between sends that batch twice and never loses it; the emptied
orphan is removed at the end. ``discard`` deletes one. Both take the spool's lock first, so they
never touch a spool another process has open.

Spools written before destination records existed are named with a hash of every pipeline
property (``legacy_pipeline_id``); on Configure with the same properties ``app`` renames such a
spool to the new id, and any other is listed as an orphan with an unknown destination.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson
import structlog

from auditrelay.config import PROPERTY_BY_NAME, Owner, PipelineSettings
from auditrelay.errors import SpoolError
from auditrelay.metrics import Metrics
from auditrelay.spool import CURSOR_FILE, LOCK_FILE, SEGMENT_SUFFIX, Spool, summarize

log = structlog.get_logger(__name__)

Appender = Callable[[Sequence[bytes]], object]  # durably stores rows in a spool
DESTINATION_FILE: Final = "destination.json"
OWNERS_FILE: Final = "pipelines.json"  # the pipelines the running (or last) serve configured
DRAIN_REQUEST_FILE: Final = "drain-to.json"  # left by `spool drain` for a running serve
MOVE_BATCH_BYTES: Final = 4 << 20
_UNSAFE_ID_CHARS: Final = re.compile(r"[^A-Za-z0-9_.-]+")


def _safe_name(instance_name: str) -> str:
    name = _UNSAFE_ID_CHARS.sub("_", instance_name).strip("._") or "pipeline"
    return name[:64]


def pipeline_id_for(settings: PipelineSettings) -> str:
    """The pipeline's id: its instance and its destination, stable across restarts of either
    side and across changes of every other property (secrets, tuning, policy)."""
    canonical = orjson.dumps(
        {"instance": settings.instance_name, "destination": settings.destination()},
        option=orjson.OPT_SORT_KEYS,
    )
    digest = hashlib.sha256(canonical).hexdigest()[:16]
    return f"{_safe_name(settings.instance_name)}-{digest}"


def legacy_pipeline_id(instance_name: str, properties: Mapping[str, str]) -> str:
    """The id earlier versions gave a pipeline: a hash of every pipeline property as written."""
    relevant = {
        key.lower(): value
        for key, value in properties.items()
        if (prop := PROPERTY_BY_NAME.get(key.lower())) is None or prop.owner is Owner.PIPELINE
    }
    canonical = orjson.dumps(
        {"instance": instance_name, "properties": relevant}, option=orjson.OPT_SORT_KEYS
    )
    digest = hashlib.sha256(canonical).hexdigest()[:16]
    return f"{_safe_name(instance_name)}-{digest}"


# --- destination records ---------------------------------------------------------------------


def write_destination(directory: Path, pipeline_id: str, settings: PipelineSettings) -> None:
    """Writes ``destination.json`` beside the spool's segments (atomically; no secret in it),
    unless it says so already: a Configure after a restart on a full disk must not fail for a
    file that need not change. Raises SpoolError when it cannot be written."""
    record = {
        "pipeline_id": pipeline_id,
        "instance_name": settings.instance_name,
        "destination": settings.destination(),
    }
    text = orjson.dumps(record, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
    path = directory / DESTINATION_FILE
    try:
        if path.is_file() and path.read_bytes() == text:
            return
        directory.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_bytes(text)
        os.replace(temporary, path)
    except OSError as error:
        raise SpoolError(f"spool {directory}: cannot write {DESTINATION_FILE}: {error}") from error


def describe(destination: Mapping[str, Any] | None) -> str:
    """A destination in words: where its rows were going."""
    if destination is None:
        return "unknown (written by an earlier version)"
    stream = destination.get("stream")
    if destination.get("endpoint") is None:
        return f"the bundled emulator, stream {stream}"
    return f"{destination['endpoint']} rule {destination.get('dcr_id')} stream {stream}"


# --- the inventory ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SpoolInfo:
    """One spool directory as found on disk."""

    pipeline_id: str
    directory: Path
    instance_name: str | None
    destination: dict[str, Any] | None
    used_bytes: int
    pending_bytes: int
    pending_rows: int | None

    def as_json(self, owned: bool) -> dict[str, Any]:
        """The machine-readable form (``--output json``)."""
        return {
            "pipeline_id": self.pipeline_id,
            "directory": str(self.directory),
            "instance_name": self.instance_name,
            "destination": self.destination,
            "destination_text": describe(self.destination),
            "used_bytes": self.used_bytes,
            "pending_bytes": self.pending_bytes,
            "pending_events": self.pending_rows,
            "state": "owned" if owned else "orphaned",
        }


def _is_spool(directory: Path) -> bool:
    return directory.is_dir() and (
        (directory / LOCK_FILE).exists()
        or (directory / CURSOR_FILE).exists()
        or any(directory.glob("*" + SEGMENT_SUFFIX))
    )


def read_record(directory: Path) -> dict[str, Any] | None:
    """The spool's destination record, or None when it has none (or it is unreadable)."""
    try:
        record = json.loads((directory / DESTINATION_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def inspect(directory: Path, *, count_rows: bool = False) -> SpoolInfo:
    """One spool directory's figures and destination, read without locking it."""
    record = read_record(directory) or {}
    summary = summarize(directory, count_rows=count_rows)
    destination = record.get("destination")
    return SpoolInfo(
        pipeline_id=directory.name,
        directory=directory,
        instance_name=record.get("instance_name"),
        destination=destination if isinstance(destination, dict) else None,
        used_bytes=summary.used_bytes,
        pending_bytes=summary.pending_bytes,
        pending_rows=summary.pending_rows,
    )


def spool_directories(root: Path) -> list[Path]:
    """Every spool directory under ``root`` (``<state_dir>/spool``), by name."""
    if not root.is_dir():
        return []
    return sorted(path for path in root.iterdir() if _is_spool(path))


def inventory(root: Path, *, count_rows: bool = False) -> list[SpoolInfo]:
    """Every spool under ``root`` with its figures."""
    return [inspect(directory, count_rows=count_rows) for directory in spool_directories(root)]


# --- moving and discarding -------------------------------------------------------------------


def move_pending(source: Path, append: Appender) -> int:
    """Appends the source spool's pending rows, in order, through ``append`` (another spool's,
    durable when it returns), acknowledging each batch here only after; removes the emptied
    source. Returns the rows moved. Raises SpoolError when the source is in use, or what
    ``append`` raises (a full target: what was moved stays moved, the rest stays here)."""
    spool = Spool(source, limit_bytes=sys.maxsize)
    moved = 0
    try:
        while (read := spool.read(MOVE_BATCH_BYTES)) is not None:
            append(read.rows)
            spool.acknowledge(read.end)
            moved += len(read.rows)
        empty = spool.pending_bytes == 0
    finally:
        spool.close()
    if empty:
        remove(source)
    return moved


def request_drain(source: Path, pipeline_id: str) -> None:
    """Asks the running serve, which holds the target's spool, to move the source's rows there."""
    path = source / DRAIN_REQUEST_FILE
    temporary = path.with_suffix(".tmp")
    temporary.write_bytes(orjson.dumps({"to_pipeline": pipeline_id}))
    os.replace(temporary, path)


def drain_request(source: Path) -> str | None:
    """The pipeline a drain request names, if the spool has one."""
    try:
        stored = json.loads((source / DRAIN_REQUEST_FILE).read_text(encoding="utf-8"))
        return str(stored["to_pipeline"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def discard(directory: Path) -> SpoolInfo:
    """Deletes a spool that no process has open; returns what it held."""
    info = inspect(directory, count_rows=True)
    spool = Spool(directory, limit_bytes=sys.maxsize)  # takes the lock, or raises SpoolError
    spool.close()
    remove(directory)
    return info


def remove(directory: Path) -> None:
    """Deletes a spool directory and everything in it."""
    for path in directory.iterdir():
        if path.name != LOCK_FILE:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    (directory / LOCK_FILE).unlink(missing_ok=True)
    try:
        directory.rmdir()
    except OSError as error:
        raise SpoolError(
            f"spool {directory}: could not remove the emptied directory: {error}"
        ) from error


def rename_unused(old: Path, new: Path) -> bool:
    """Renames spool directory ``old`` to ``new`` when no process has it open and ``new`` does
    not exist yet; True when renamed."""
    if not _is_spool(old) or new.exists():
        return False
    spool = Spool(old, limit_bytes=sys.maxsize)  # takes the lock, or raises SpoolError
    try:
        os.rename(old, new)
    finally:
        spool.close()
    return True


# --- owners and orphans ----------------------------------------------------------------------


def record_owners(root: Path, pipeline_ids: Iterable[str]) -> None:
    """Writes which pipelines this serve has configured, for ``auditrelay spool list``."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / OWNERS_FILE
    temporary = path.with_suffix(".tmp")
    temporary.write_bytes(orjson.dumps({"pipelines": sorted(pipeline_ids)}))
    os.replace(temporary, path)


def read_owners(root: Path) -> set[str]:
    """The pipelines the running (or the last) serve configured; empty when unknown."""
    try:
        stored = json.loads((root / OWNERS_FILE).read_text(encoding="utf-8"))
        return {str(name) for name in stored["pipelines"]}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


class OrphanWatch:
    """The spools no configured pipeline owns, as ``serve`` reports them.

    Pipelines configure themselves after ``serve`` starts (at Fluent Bit's start, or at its first
    flush after the sidecar restarted), so a spool counts as orphaned only once ``after`` seconds
    have passed since start without a pipeline claiming it. Orphans with nothing pending strand
    nothing and are not reported (``auditrelay spool list`` still shows them).
    """

    def __init__(
        self,
        root: Path,
        owned: Callable[[], Collection[str]],
        *,
        after: float,
        appender: Callable[[str], Appender | None] = lambda _pipeline_id: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = root
        self._owned = owned
        self._appender = appender
        self._after = after
        self._clock = clock
        self._since = clock()
        self._reported: set[str] = set()

    def orphans(self) -> list[SpoolInfo]:
        """Spools with pending rows that no pipeline owns (empty during the first ``after`` s)."""
        if self._clock() - self._since < self._after:
            return []
        owned = set(self._owned())
        found = [
            inspect(directory)
            for directory in spool_directories(self.root)
            if directory.name not in owned
        ]
        return [info for info in found if info.pending_bytes > 0]

    def problems(self) -> list[str]:
        """One /readyz line per orphan."""
        return [
            f"spool {info.pipeline_id} is orphaned: {info.pending_bytes} bytes pending for "
            f"{describe(info.destination)}, and no configured pipeline delivers there; "
            "see `auditrelay spool list`, then `spool drain` or `spool discard` it"
            for info in self.orphans()
        ]

    def bind(self, metrics: Metrics) -> None:
        """Exports ``auditrelay_spool_orphaned_bytes`` and ``auditrelay_spools_orphaned``."""
        metrics.spool_orphaned_bytes.set_function(
            lambda: float(sum(info.pending_bytes for info in self.orphans()))
        )
        metrics.spools_orphaned.set_function(lambda: float(len(self.orphans())))

    def check(self) -> None:
        """Carries out drain requests whose pipeline runs here; logs each orphan when it is
        first seen, and when it is gone (drained, discarded, claimed by a late pipeline)."""
        self._drain_requested()
        orphans = {info.pipeline_id: info for info in self.orphans()}
        for pipeline_id in sorted(orphans.keys() - self._reported):
            info = orphans[pipeline_id]
            log.warning(
                "spool_orphaned",
                spool=pipeline_id,
                directory=str(info.directory),
                destination=describe(info.destination),
                pending_bytes=info.pending_bytes,
                hint="no configured pipeline delivers to it: auditrelay spool list, then "
                "spool drain --to-pipeline ID or spool discard --yes",
            )
        for pipeline_id in sorted(self._reported - orphans.keys()):
            log.info("spool_orphan_resolved", spool=pipeline_id)
        self._reported = set(orphans)

    def _drain_requested(self) -> None:
        owned = set(self._owned())
        for directory in spool_directories(self.root):
            target = drain_request(directory)
            append = self._appender(target) if target is not None else None
            if target is None or append is None or directory.name in owned:
                continue
            try:
                moved = move_pending(directory, append)
            except (SpoolError, RuntimeError) as error:  # target full or restarting: retry later
                log.warning("spool_drain_paused", spool=directory.name, to=target, error=str(error))
                continue
            log.info("spool_drained", spool=directory.name, to=target, events=moved)
