"""The bundled emulator as a test pipeline's destination: the properties that point a pipeline at
it, with a client secret, as an operator's [OUTPUT] section would."""

from __future__ import annotations

from typing import Final

from auditrelay.emulator import DEFAULT_DCR_ID, Emulator

TENANT: Final = "72f988bf-0000-0000-0000-00000000abcd"
CLIENT: Final = "0a1b2c3d-0000-0000-0000-00000000abcd"
ANY_SECRET: Final = "emulator-accepts-any-secret"


def emulator_destination(emulator: Emulator, secret: str = ANY_SECRET) -> dict[str, str]:
    """``endpoint``, its CA, the rule and the client-secret credential of the emulator's Entra."""
    return {
        "endpoint": emulator.endpoint,
        "endpoint_ca": str(emulator.ca_file),
        "dcr_id": DEFAULT_DCR_ID,
        "auth": "client_secret",
        "authority_host": emulator.authority_host,
        "tenant_id": TENANT,
        "client_id": CLIENT,
        "client_secret": secret,
    }
