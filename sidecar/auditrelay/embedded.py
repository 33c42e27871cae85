"""The bundled emulator as the destination of pipelines without an ``endpoint``.

``serve`` and ``replay`` start it the first time a pipeline needs it, as a child process of its
own (``emulator_process``, state under ``<state_dir>/emulator/``), so that its work does not
share their interpreter, and hand those pipelines a ``DeliverySink`` that delivers to it over
real HTTPS with a real client-secret credential.
"""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path
from typing import Final

import structlog

from auditrelay.config import PipelineSettings
from auditrelay.deliver import Destination, secret_credential_factory
from auditrelay.emulator_process import EmulatorProcess
from auditrelay.metrics import PipelineMetrics
from auditrelay.model import DeadLetterSink
from auditrelay.sink import DeliverySink

log = structlog.get_logger("auditrelay.embedded")

# The identity the embedded emulator's token endpoint sees; it accepts any client's secret.
EMULATOR_TENANT: Final = "auditrelay-embedded"
EMULATOR_CLIENT: Final = "auditrelay-sidecar"


class EmbeddedEmulator:
    """The bundled emulator as the destination of pipelines without an ``endpoint``.

    Runs in a child process (``emulator_process.EmulatorProcess``), started once, the first
    time a pipeline needs it; its CA, token authority and a client secret of this process's own
    are what those pipelines use.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._emulator: EmulatorProcess | None = None
        self._starting: asyncio.Task[EmulatorProcess] | None = None
        self._secret = secrets.token_urlsafe(24)

    @property
    def running(self) -> EmulatorProcess | None:
        """The emulator once started."""
        return self._emulator

    async def ensure_started(self) -> EmulatorProcess:
        """The running emulator, started on the first call.

        The start runs in a task of its own, shielded from the caller: a ``Configure`` cancelled
        at the plugin's deadline (a child slow to start on a busy node) must not abort it, or
        each retry would start another child and none would finish. Later callers wait for the
        same start; after a failed one, the next call starts again.
        """
        if self._emulator is not None:
            return self._emulator
        starting = self._starting
        if starting is None or (starting.done() and _failed(starting)):
            starting = asyncio.get_running_loop().create_task(self._start())
            self._starting = starting
        return await asyncio.shield(starting)

    async def _start(self) -> EmulatorProcess:
        emulator = EmulatorProcess(self.state_dir)
        await emulator.start()
        self._emulator = emulator
        return emulator

    async def sink_for(
        self,
        settings: PipelineSettings,
        *,
        directory: Path,
        metrics: PipelineMetrics,
        dead_letters: DeadLetterSink,
    ) -> DeliverySink:
        """A DeliverySink that delivers to the emulator with a real client-secret credential."""
        info = (await self.ensure_started()).info
        destination = Destination(
            endpoint=info.endpoint,
            rule_id=info.dcr_id,
            stream=settings.stream,
            audience=info.audience,
            ca_file=info.ca_file,
        )
        credentials = secret_credential_factory(
            info.authority_host, EMULATOR_TENANT, EMULATOR_CLIENT, self._secret
        )
        log.info(
            "pipeline_delivers_to_emulator",
            pipeline=settings.instance_name,
            endpoint=info.endpoint,
            store=str(info.database),
            note="no endpoint is set: rows go to the bundled local emulator, not to Azure",
            ignored=settings.ignored_by_emulator,
        )
        return DeliverySink(
            settings,
            directory=directory,
            metrics=metrics,
            dead_letters=dead_letters,
            destination=destination,
            credential_factory=credentials,
        )

    async def stop(self) -> None:
        """Stops the emulator if it runs, waiting for a start under way first."""
        starting, self._starting = self._starting, None
        if starting is not None:
            await asyncio.gather(starting, return_exceptions=True)
        if self._emulator is not None:
            await self._emulator.stop()
            self._emulator = None


def _failed(task: asyncio.Task[EmulatorProcess]) -> bool:
    return task.cancelled() or task.exception() is not None
