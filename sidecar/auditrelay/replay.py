"""Backfill of existing audit log files through a pipeline (``auditrelay replay``).

Each file (plain, or gzip by its magic bytes) is read as the JSON lines kube-apiserver writes,
in batches. A batch goes through the same stages a Push does: every line becomes a Fluent Bit
record ``{"log": <line>}`` that ``decode`` checks like any other, the pipeline's
``PolicyFilter`` drops or lowers the events, and the ``DeliverySink`` spools, batches and
delivers the rows. Lines that are not audit events are reported with their file and line
number, set aside in the pipeline's dead letters, and never stop the lines after them.

Resuming: after a batch is durable in the spool, the file's checkpoint is written (atomically,
fsynced): the file's identity (path, inode, size, SHA-256 of its first KiB) and the offset and
number of the first line not yet spooled. A later run to the same destination and state
directory opens the same spool (resending what it still holds) and goes on from each checkpoint,
so an interruption, even SIGKILL, loses nothing; at most the batch that was being spooled when
it struck is sent twice. A file whose identity changed (rotated, rewritten) is read from its
start; a completed file that has not grown is skipped.

State directory layout (per pipeline id, from the instance name and the destination)::

    replay/<pipeline_id>/spool/            the DeliverySink's spool
    replay/<pipeline_id>/deadletter/       lines that are not audit events, rows refused (400)
    replay/<pipeline_id>/checkpoints/      one JSON file per input file
    emulator/                              the bundled emulator, when no endpoint is set
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import io
import os
import re
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final, TextIO

import msgpack
import orjson
import yaml

from auditrelay.config import PipelineSettings, SpoolSync
from auditrelay.deadletter import DeadLetterStore
from auditrelay.decode import Reason, decode_chunk
from auditrelay.embedded import EmbeddedEmulator
from auditrelay.errors import ConfigError, PropertyProblem, SpoolFullError
from auditrelay.filter import PolicyFilter
from auditrelay.metrics import Metrics
from auditrelay.model import AuditEvent, DeadLetter
from auditrelay.sink import DeliverySink
from auditrelay.spools import legacy_pipeline_id, pipeline_id_for

HEAD_BYTES: Final = 1024  # the start of a file that, with its inode, identifies it
BATCH_LINES: Final = 2000
BATCH_BYTES: Final = 4 << 20
GZIP_MAGIC: Final = b"\x1f\x8b"
SPOOL_FULL_PAUSE: Final = 0.1  # seconds between tries while delivery makes room in the spool
INSTANCE_NAME: Final = "replay"
SPOOL_SHARE: Final = 8  # a batch of lines is at most this fraction of spool_limit
MAX_INVALID_SHOWN: Final = 100

REASON_TEXT: Final = {
    Reason.LOG_NOT_JSON: "not JSON",
    Reason.JSON_NOT_OBJECT: "JSON, but not an object",
    Reason.NOT_AUDIT_EVENT: 'not an audit event (kind is not "Event")',
    Reason.UNSUPPORTED_API_VERSION: "apiVersion is not audit.k8s.io/v1 or v1beta1",
    Reason.MISSING_AUDIT_ID: "no auditID",
    Reason.MISSING_STAGE: "no stage",
    Reason.MISSING_LEVEL: "no level",
    Reason.NON_UTF8: "not valid UTF-8",
}


# --- files and checkpoints ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FileIdentity:
    """What tells one audit log file from another that later took its path."""

    path: str
    inode: int
    size: int
    head_sha256: str
    head_bytes: int


def identify(path: Path) -> FileIdentity:
    """The identity of the file at ``path`` as it is now."""
    with path.open("rb") as handle:
        stat = os.fstat(handle.fileno())
        head = handle.read(HEAD_BYTES)
    return FileIdentity(
        str(path.resolve()), stat.st_ino, stat.st_size, hashlib.sha256(head).hexdigest(), len(head)
    )


def _same_file(recorded: FileIdentity, path: Path, current: FileIdentity) -> bool:
    """The same inode with the same first bytes (as far as the recorded head went)."""
    if recorded.inode != current.inode or recorded.head_bytes > current.head_bytes:
        return False
    with path.open("rb") as handle:
        head = handle.read(recorded.head_bytes)
    return hashlib.sha256(head).hexdigest() == recorded.head_sha256


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """How far one file is durably spooled: ``offset`` bytes of its (decompressed) text, which
    are its first ``line`` lines; ``complete`` once its last line is spooled."""

    identity: FileIdentity
    offset: int
    line: int
    complete: bool = False


class CheckpointStore:
    """One checkpoint file per input file, written atomically and fsynced."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def path_for(self, source: Path) -> Path:
        """Where the checkpoint of ``source`` lives."""
        digest = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:32]
        return self.directory / f"{digest}.json"

    def load(self, source: Path, current: FileIdentity) -> Checkpoint | None:
        """The checkpoint of this very file, or None (never read, or a different file now)."""
        try:
            document = orjson.loads(self.path_for(source).read_bytes())
            checkpoint = Checkpoint(
                identity=FileIdentity(**document["identity"]),
                offset=int(document["offset"]),
                line=int(document["line"]),
                complete=bool(document["complete"]),
            )
        except FileNotFoundError:
            return None
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None  # a damaged checkpoint: reading again from the start loses nothing
        if not _same_file(checkpoint.identity, source, current):
            return None
        return checkpoint

    def save(self, source: Path, checkpoint: Checkpoint) -> None:
        """Replaces the checkpoint of ``source``; on return it survives a crash."""
        target = self.path_for(source)
        temporary = target.with_suffix(".tmp")
        data = orjson.dumps(asdict(checkpoint), option=orjson.OPT_INDENT_2)
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(descriptor, data)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temporary, target)
        directory = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


@dataclass(slots=True)
class LineBatch:
    """Consecutive lines of one file: the first one's number, and where the batch ends."""

    lines: list[bytes]
    first_line: int  # 1-based number of lines[0]
    end_offset: int  # text offset just after the batch
    end_line: int  # lines of the file up to and including the batch
    raw_position: int  # bytes of the file on disk consumed so far (progress)


def _open_text(path: Path) -> tuple[io.BufferedReader, io.BufferedIOBase]:
    """The file on disk, and its text: the same object, or a gzip reader over it."""
    raw = path.open("rb")
    if raw.read(2) == GZIP_MAGIC:
        raw.seek(0)
        return raw, gzip.GzipFile(fileobj=raw, mode="rb")
    raw.seek(0)
    return raw, raw


def read_batches(
    path: Path, offset: int, line: int, max_bytes: int = BATCH_BYTES
) -> Generator[LineBatch, None, None]:
    """The lines of ``path`` after the first ``offset`` bytes (``line`` lines) of its text."""
    raw, text = _open_text(path)
    with raw, text:
        if text is raw:
            raw.seek(offset)
        else:
            _skip(text, offset)
        lines: list[bytes] = []
        size = 0
        first = line + 1
        for current in text:
            offset += len(current)
            line += 1
            lines.append(current)
            size += len(current)
            if len(lines) >= BATCH_LINES or size >= max_bytes:
                yield LineBatch(lines, first, offset, line, raw.tell())
                lines, size, first = [], 0, line + 1
        if lines:
            yield LineBatch(lines, first, offset, line, raw.tell())


def _skip(text: io.BufferedIOBase, count: int) -> None:
    """Reads and discards ``count`` bytes (a gzip stream cannot seek cheaply)."""
    left = count
    while left > 0:
        block = text.read(min(left, 1 << 20))
        if not block:
            break
        left -= len(block)


# --- the [OUTPUT] section of a Fluent Bit configuration ----------------------------------------

# Keys Fluent Bit keeps for itself in an [OUTPUT] section; they never reach the plugin.
FLUENT_BIT_OUTPUT_KEYS: Final = frozenset(
    {"name", "match", "match_regex", "alias", "log_level", "log_suppress_interval",
     "retry_limit", "workers", "host", "port", "event_type", "processors"}
)  # fmt: skip
FLUENT_BIT_OUTPUT_PREFIXES: Final = ("tls", "net.", "storage.")
_VARIABLE: Final = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True, slots=True)
class OutputSection:
    """One ``[OUTPUT] Name auditrelay`` section: its instance name and its keys."""

    instance_name: str  # auditrelay.N in the order Fluent Bit creates them
    alias: str | None
    keys: dict[str, str]

    def properties(self) -> dict[str, str]:
        """The plugin's properties: the section without the keys Fluent Bit keeps."""
        return {
            key: value
            for key, value in self.keys.items()
            if key not in FLUENT_BIT_OUTPUT_KEYS and not key.startswith(FLUENT_BIT_OUTPUT_PREFIXES)
        }


def _expand(value: str, variables: Mapping[str, str]) -> str:
    """Fluent Bit's ${VAR}: a @SET/env variable, else the environment, else empty."""
    return _VARIABLE.sub(lambda match: variables.get(match[1], os.environ.get(match[1], "")), value)


def _problem(path: Path, expected: str) -> ConfigError:
    return ConfigError([PropertyProblem("--config", str(path), expected)])


def _classic_outputs(path: Path, variables: dict[str, str], depth: int = 0) -> list[dict[str, str]]:
    """The [OUTPUT] sections of a classic-format file, following @INCLUDE, applying @SET."""
    if depth > 8:
        raise _problem(path, "an @INCLUDE chain of at most 8 files")
    outputs: list[dict[str, str]] = []
    current: dict[str, str] | None = None
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = text.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("@SET "):
            key, _, value = line[5:].strip().partition("=")
            variables[key.strip()] = _expand(value.strip(), variables)
        elif line.startswith("@INCLUDE "):
            pattern = line[9:].strip()
            for included in sorted(path.parent.glob(pattern)) or [path.parent / pattern]:
                outputs += _classic_outputs(included, variables, depth + 1)
        elif line.startswith("["):
            if not line.endswith("]"):
                raise _problem(path, f"a [SECTION] header on line {number}, got {line!r}")
            current = {} if line[1:-1].strip().upper() == "OUTPUT" else None
            if current is not None:
                outputs.append(current)
        elif current is not None:
            key, _, value = line.partition(" ")
            current[key.lower()] = _expand(value.strip(), variables)
    return outputs


def _yaml_outputs(path: Path) -> list[dict[str, str]]:
    """The pipeline.outputs entries of a YAML-format file, with its env: variables."""
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise _problem(path, f"a YAML Fluent Bit configuration ({error})") from None
    if not isinstance(document, dict):
        raise _problem(path, "a YAML mapping with pipeline: outputs:")
    variables = {str(k): str(v) for k, v in (document.get("env") or {}).items()}
    outputs = (document.get("pipeline") or {}).get("outputs") or []
    return [
        {str(key).lower(): _expand(_yaml_text(value), variables) for key, value in entry.items()}
        for entry in outputs
        if isinstance(entry, dict)
    ]


def _yaml_text(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def output_sections(path: Path) -> list[OutputSection]:
    """Every auditrelay output of a Fluent Bit configuration file (classic or YAML)."""
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            outputs = _yaml_outputs(path)
        else:
            outputs = _classic_outputs(path, {})
    except OSError as error:
        raise _problem(path, f"a readable Fluent Bit configuration ({error.strerror})") from None
    ours = [keys for keys in outputs if keys.get("name", "").lower() == "auditrelay"]
    return [
        OutputSection(f"auditrelay.{index}", keys.get("alias"), keys)
        for index, keys in enumerate(ours)
    ]


def select_output(path: Path, wanted: str | None) -> OutputSection:
    """The one auditrelay output of the file, or the one named (alias or auditrelay.N)."""
    sections = output_sections(path)
    names = ", ".join(section.alias or section.instance_name for section in sections)
    if wanted is not None:
        for section in sections:
            if wanted in (section.alias, section.instance_name):
                return section
        raise ConfigError(
            [PropertyProblem("--output", wanted, f"one of the auditrelay outputs: {names}")]
        )
    if len(sections) != 1:
        found = f"{len(sections)}: {names}" if sections else "none"
        raise _problem(path, f"exactly one [OUTPUT] Name auditrelay, or --output (found {found})")
    return sections[0]


# --- one batch through decode and filter -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InvalidLine:
    """A line that is not an audit event."""

    path: Path
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {REASON_TEXT.get(self.reason, self.reason)}"


@dataclass(slots=True)
class BatchOutcome:
    """What decode and the filter made of one batch."""

    kept: list[AuditEvent]
    events: int
    invalid: list[InvalidLine]
    letters: list[DeadLetter]
    blank: int


def process_batch(
    path: Path, batch: LineBatch, apply: Callable[[AuditEvent], AuditEvent | None]
) -> BatchOutcome:
    """Decodes the lines as Fluent Bit ``log`` records and applies the filter to the events."""
    pack = msgpack.Packer(use_bin_type=True).pack
    packed: list[bytes] = []
    numbers: list[int] = []
    blank = 0
    for number, line in enumerate(batch.lines, start=batch.first_line):
        text = line.rstrip(b"\r\n")
        if not text.strip():
            blank += 1
            continue
        packed.append(pack([0, {"log": text}]))
        numbers.append(number)
    if not packed:
        return BatchOutcome([], 0, [], [], blank)
    decoded = decode_chunk(b"".join(packed), f"replay:{path}")
    kept = [lowered for event in decoded.events if (lowered := apply(event)) is not None]
    invalid: list[InvalidLine] = []
    letters: list[DeadLetter] = []
    if decoded.dead_letters:
        where: dict[bytes, list[int]] = {}
        for event_bytes, number in zip(packed, numbers, strict=True):
            where.setdefault(event_bytes, []).append(number)
        lines = {number: batch.lines[number - batch.first_line] for number in numbers}
        for letter in decoded.dead_letters:
            number = where[letter.payload].pop(0)
            invalid.append(InvalidLine(path, number, letter.reason))
            letters.append(
                DeadLetter(letter.reason, lines[number].rstrip(b"\r\n"), f"{path}:{number}")
            )
    return BatchOutcome(kept, len(decoded.events), invalid, letters, blank)


# --- totals and progress -----------------------------------------------------------------------


@dataclass(slots=True)
class Totals:
    """What one run did."""

    files: int = 0
    files_skipped: int = 0
    lines_read: int = 0
    events: int = 0
    kept: int = 0
    filtered: int = 0
    invalid: int = 0
    bytes_read: int = 0  # of the files on disk (compressed, for .gz)
    text_bytes: int = 0  # of the lines
    invalid_lines: list[InvalidLine] = field(default_factory=list)


class Progress:
    """A progress bar on a terminal, or a plain line every ``interval`` seconds otherwise."""

    def __init__(self, stream: TextIO, total_bytes: int, *, interval: float | None = None) -> None:
        self.stream = stream
        self.total_bytes = max(total_bytes, 1)
        self.is_terminal = stream.isatty()
        self.interval = interval if interval is not None else (0.1 if self.is_terminal else 5.0)
        self._last = 0.0
        self._width = 0
        self._shown = ""

    def update(self, line: str, fraction: float, *, force: bool = False) -> None:
        """Shows the state, at most once per interval unless forced."""
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        if self.is_terminal:
            filled = int(30 * min(max(fraction, 0.0), 1.0))
            text = f"\r[{'#' * filled}{'.' * (30 - filled)}] {fraction:4.0%} {line}"
            padding = max(0, self._width - len(text))
            self._width = len(text)
            self.stream.write(text + " " * padding)
        else:
            text = f"replay: {fraction:.0%} {line}\n"
            if text == self._shown:
                return
            self._shown = text
            self.stream.write(text)
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line of its own (an invalid line, a skipped file), above the bar."""
        if self.is_terminal and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0
        self.stream.write(text + "\n")
        self.stream.flush()

    def done(self) -> None:
        """Ends the bar's line."""
        if self.is_terminal and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0


def _human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


# --- the run -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplayOptions:
    """How one ``auditrelay replay`` runs."""

    files: Sequence[Path]
    properties: Mapping[str, str]
    state_dir: Path
    deliver_timeout: float | None = None  # None: wait until everything is delivered
    progress_interval: float | None = None


@dataclass(slots=True)
class ReplayResult:
    """The outcome the command reports."""

    totals: Totals
    delivered: int
    refused: int
    sent_bytes: int
    spooled_bytes: int
    undelivered_bytes: int
    endpoint: str
    stream: str
    interrupted: bool
    emulator_dir: Path | None


def check_inputs(files: Sequence[Path]) -> None:
    """Raises ConfigError naming every input that is not a readable file."""
    problems = [
        PropertyProblem("AUDIT_LOG", str(path), "a readable audit log file (plain or .gz)")
        for path in files
        if not path.is_file() or not os.access(path, os.R_OK)
    ]
    if problems:
        raise ConfigError(problems)


class Replay:
    """One run: the pipeline, the files, the checkpoints."""

    def __init__(
        self, options: ReplayOptions, stop: asyncio.Event, progress_stream: TextIO
    ) -> None:
        check_inputs(options.files)
        self.options = options
        self.stop = stop
        self.settings = PipelineSettings.from_properties(options.properties, INSTANCE_NAME)
        self.pipeline_id = pipeline_id_for(self.settings)
        self.base = options.state_dir / "replay" / self.pipeline_id
        legacy = (
            options.state_dir / "replay" / legacy_pipeline_id(INSTANCE_NAME, options.properties)
        )
        if legacy.is_dir() and not self.base.exists():
            legacy.rename(self.base)  # a run of an earlier version, named by every property
        self.filter = PolicyFilter.from_file(self.settings.policy)
        self.metrics = Metrics()
        self.totals = Totals()
        self.progress = Progress(
            progress_stream,
            sum(path.stat().st_size for path in options.files),
            interval=options.progress_interval,
        )
        # A batch is spooled whole: a small spool gets small batches, so one always fits.
        self.batch_bytes = max(1, min(BATCH_BYTES, self.settings.spool_limit // SPOOL_SHARE))
        self._done_bytes = 0  # of the files finished or skipped
        self._sink: DeliverySink | None = None

    @property
    def sink(self) -> DeliverySink:
        """The pipeline's sink (while running)."""
        if self._sink is None:
            raise RuntimeError("replay: the sink is not started")
        return self._sink

    def _sample(self, name: str) -> int:
        value = self.metrics.registry.get_sample_value(name, {"pipeline": self.pipeline_id})
        return int(value or 0)

    async def run(self) -> ReplayResult:
        """Replays every file, waits for delivery, and says what happened."""
        checkpoints = CheckpointStore(self.base / "checkpoints")
        dead_letters = DeadLetterStore(self.base / "deadletter")
        emulator_dir: Path | None = None
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(dead_letters.close)
            directory = self.base / "spool"
            metrics = self.metrics.pipeline(self.pipeline_id)
            if self.settings.uses_emulator:
                emulator_dir = self.options.state_dir / "emulator"
                embedded = EmbeddedEmulator(emulator_dir)
                stack.push_async_callback(embedded.stop)
                self._sink = await embedded.sink_for(
                    self.settings, directory=directory, metrics=metrics, dead_letters=dead_letters
                )
                endpoint = embedded.running.endpoint if embedded.running else ""
            else:
                endpoint = str(self.settings.endpoint)
                self._sink = DeliverySink(
                    self.settings, directory=directory, metrics=metrics, dead_letters=dead_letters
                )
            await self._sink.start()
            delivered_all = False
            try:
                for path in self.options.files:
                    if self.stop.is_set():
                        break
                    await self._replay_file(path, checkpoints, dead_letters)
                delivered_all = not self.stop.is_set() and await self._wait_delivered()
            finally:
                undelivered = self._sink.spool.pending_bytes
                self.progress.done()
                await self._sink.stop(drain_seconds=0.0 if delivered_all else 1.0)
        return ReplayResult(
            totals=self.totals,
            delivered=self._sample("auditrelay_events_delivered_total"),
            refused=self._sample("auditrelay_events_dead_lettered_total"),
            sent_bytes=self._sample("auditrelay_compressed_bytes_total"),
            spooled_bytes=self._sample("auditrelay_spooled_bytes_total"),
            undelivered_bytes=0 if delivered_all else undelivered,
            endpoint=endpoint,
            stream=self.settings.stream,
            interrupted=self.stop.is_set(),
            emulator_dir=emulator_dir,
        )

    async def _replay_file(
        self, path: Path, checkpoints: CheckpointStore, dead_letters: DeadLetterStore
    ) -> None:
        identity = await asyncio.to_thread(identify, path)
        checkpoint = await asyncio.to_thread(checkpoints.load, path, identity)
        self.totals.files += 1
        if checkpoint is not None and checkpoint.complete and checkpoint.identity == identity:
            self.totals.files_skipped += 1
            self._done_bytes += identity.size
            self.progress.message(f"{path}: already replayed ({checkpoint.line:,} lines); skipped")
            return
        offset, line = (checkpoint.offset, checkpoint.line) if checkpoint else (0, 0)
        if offset:
            self.progress.message(f"{path}: resuming after line {line:,}")
        batches = read_batches(path, offset, line, self.batch_bytes)
        try:
            while True:
                batch = await asyncio.to_thread(next, batches, None)
                if batch is None:
                    break
                outcome = await asyncio.to_thread(process_batch, path, batch, self.filter.apply)
                if outcome.letters:
                    await asyncio.to_thread(dead_letters.put, outcome.letters)
                if not await self._append(outcome.kept):
                    return  # stopped: the checkpoint stays before this batch
                offset, line = batch.end_offset, batch.end_line
                if self.settings.spool_sync is SpoolSync.INTERVAL:
                    await asyncio.to_thread(self.sink.spool.sync)  # the checkpoint must not lead
                await asyncio.to_thread(checkpoints.save, path, Checkpoint(identity, offset, line))
                self._count(batch, outcome)
                self._show(batch.raw_position)
                if self.stop.is_set():
                    return
        finally:
            batches.close()
        self._done_bytes += identity.size
        await asyncio.to_thread(checkpoints.save, path, Checkpoint(identity, offset, line, True))

    def _count(self, batch: LineBatch, outcome: BatchOutcome) -> None:
        totals = self.totals
        totals.lines_read += len(batch.lines)
        totals.text_bytes += sum(len(line) for line in batch.lines)
        totals.events += outcome.events
        totals.kept += len(outcome.kept)
        totals.filtered += outcome.events - len(outcome.kept)
        totals.invalid += len(outcome.invalid)
        for invalid in outcome.invalid:
            shown = len(totals.invalid_lines)
            if shown < MAX_INVALID_SHOWN:
                totals.invalid_lines.append(invalid)
                self.progress.message(f"invalid line {invalid}")
            elif shown == MAX_INVALID_SHOWN:
                totals.invalid_lines.append(invalid)
                self.progress.message("more invalid lines: only their count is reported")

    async def _append(self, events: list[AuditEvent]) -> bool:
        """Spools the events, waiting while the spool is full; False when stopped meanwhile."""
        if not events:
            return True
        while not self.stop.is_set():
            try:
                await self.sink.append(events)
            except SpoolFullError as error:
                if self.sink.spool.pending_bytes == 0:  # nothing to deliver will make room
                    raise self._cannot_fit(len(events), error) from None
                self._show_waiting("spool full: waiting for delivery to make room")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), SPOOL_FULL_PAUSE)
                continue
            return True
        return False

    def _cannot_fit(self, rows: int, error: SpoolFullError) -> ConfigError:
        limit = self.settings.spool_limit
        return ConfigError(
            [
                PropertyProblem(
                    "spool_limit", str(limit), f"room for {rows} rows even when empty: {error}"
                )
            ]
        )

    def _status(self) -> str:
        totals = self.totals
        return (
            f"{_human_bytes(totals.bytes_read)} of {_human_bytes(self.progress.total_bytes)}"
            f"  lines {totals.lines_read:,}  kept {totals.kept:,}  filtered {totals.filtered:,}"
            f"  invalid {totals.invalid:,}"
            f"  delivered {self._sample('auditrelay_events_delivered_total'):,}"
        )

    def _fraction(self) -> float:
        return self.totals.bytes_read / self.progress.total_bytes

    def _show(self, position: int) -> None:
        self.totals.bytes_read = self._done_bytes + position
        self.progress.update(self._status(), self._fraction())

    def _show_waiting(self, why: str) -> None:
        problems = self.sink.problems()
        shown = f"{why} ({problems[0]})" if problems else why
        self.progress.update(f"{self._status()}  {shown}", self._fraction())

    async def _wait_delivered(self) -> bool:
        """Waits until the spool is empty; False on timeout or stop."""
        self.totals.bytes_read = self._done_bytes
        timeout = self.options.deliver_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.sink.spool.pending_bytes > 0:
            if self.stop.is_set() or (deadline is not None and time.monotonic() > deadline):
                return False
            pending = _human_bytes(self.sink.spool.pending_bytes)
            self._show_waiting(f"delivering: {pending} of rows left")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 0.05)
        self.progress.update(self._status(), 1.0, force=True)
        return True


def summary_lines(result: ReplayResult) -> list[str]:
    """The final summary, for people."""
    totals = result.totals
    lines = [
        f"files:      {totals.files} ({totals.files_skipped} already replayed, skipped)",
        f"lines read: {totals.lines_read:,} ({_human_bytes(totals.text_bytes)} of text, "
        f"{_human_bytes(totals.bytes_read)} on disk)",
        f"events:     {totals.events:,}",
        f"filtered:   {totals.filtered:,} (dropped or lowered away by the audit policy)",
        f"invalid:    {totals.invalid:,} (not audit events; set aside)",
        f"kept:       {totals.kept:,}",
        f"delivered:  {result.delivered:,} rows to {result.endpoint} ({result.stream})",
        f"bytes:      {_human_bytes(result.spooled_bytes)} of rows, "
        f"{_human_bytes(result.sent_bytes)} sent gzip-compressed",
    ]
    if result.refused:
        lines.append(f"refused:    {result.refused:,} rows refused by the service (dead letters)")
    if result.undelivered_bytes:
        lines.append(
            f"pending:    {_human_bytes(result.undelivered_bytes)} of rows wait in the spool; "
            "run the same command again to deliver them"
        )
    if result.interrupted:
        lines.append("interrupted: run the same command again to continue where it stopped")
    if result.emulator_dir is not None:
        lines.append(
            f"emulator:   rows stored in {result.emulator_dir} "
            f"(auditrelay emulator count --state-dir {result.emulator_dir})"
        )
    return lines
