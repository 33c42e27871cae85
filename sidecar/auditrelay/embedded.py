"""The bundled emulator as the destination of pipelines without an ``endpoint``.

``serve`` and ``replay`` start it in their own process the first time a pipeline needs it
(state under ``<state_dir>/emulator/``) and hand those pipelines a ``DeliverySink`` that
delivers to it over real HTTPS with a real client-secret credential.
"""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path
from typing import Final

import structlog

from auditrelay.config import PipelineSettings
from auditrelay.deliver import Destination, secret_credential_factory
from auditrelay.emulator import Emulator, EmulatorSettings
from auditrelay.errors import AuditRelayError
from auditrelay.metrics import PipelineMetrics
from auditrelay.model import DeadLetterSink
from auditrelay.sink import DeliverySink

log = structlog.get_logger("auditrelay.embedded")

# The identity the embedded emulator's token endpoint sees; it accepts any client's secret.
EMULATOR_TENANT: Final = "auditrelay-embedded"
EMULATOR_CLIENT: Final = "auditrelay-sidecar"


class EmbeddedEmulator:
    """The bundled emulator as the destination of pipelines without an ``endpoint``.

    Runs in this process, started once, the first time a pipeline needs it; its CA, token
    authority and a client secret of this process's own are what those pipelines use.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._emulator: Emulator | None = None
        self._lock = asyncio.Lock()
        self._secret = secrets.token_urlsafe(24)

    @property
    def running(self) -> Emulator | None:
        """The emulator once started."""
        return self._emulator

    async def ensure_started(self) -> Emulator:
        """The running emulator, started on the first call."""
        async with self._lock:
            if self._emulator is None:
                emulator = Emulator(EmulatorSettings(state_dir=self.state_dir))
                try:
                    await emulator.start()
                except OSError as error:
                    raise AuditRelayError(
                        f"the bundled emulator could not start in {self.state_dir}: {error}"
                    ) from error
                self._emulator = emulator
            return self._emulator

    async def sink_for(
        self,
        settings: PipelineSettings,
        *,
        directory: Path,
        metrics: PipelineMetrics,
        dead_letters: DeadLetterSink,
    ) -> DeliverySink:
        """A DeliverySink that delivers to the emulator with a real client-secret credential."""
        emulator = await self.ensure_started()
        destination = Destination(
            endpoint=emulator.endpoint,
            rule_id=emulator.dcr_id,
            stream=settings.stream,
            audience=emulator.settings.audience,
            ca_file=emulator.ca_file,
        )
        credentials = secret_credential_factory(
            emulator.authority_host, EMULATOR_TENANT, EMULATOR_CLIENT, self._secret
        )
        log.info(
            "pipeline_delivers_to_emulator",
            pipeline=settings.instance_name,
            endpoint=emulator.endpoint,
            store=str(emulator.store.path),
            note="no endpoint is set: rows go to the bundled local emulator, not to Azure",
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
        """Stops the emulator if it runs."""
        if self._emulator is not None:
            await self._emulator.stop()
            self._emulator = None
