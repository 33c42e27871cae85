"""The emulator's token clock can jump (the soak's fault): tokens it issues meanwhile are refused
where they are checked, as with a token authority whose clock is off; right again, it recovers."""

from __future__ import annotations

import pytest
from auditrelay.emulator.tokens import TokenIssuer, TokenRejectedError

AUDIENCE = "https://monitor.azure.com"


def _issuer() -> TokenIssuer:
    return TokenIssuer(b"k" * 32, audience=AUDIENCE, lifetime=3600)


def _bearer(issuer: TokenIssuer) -> str:
    token, _ = issuer.issue(tenant="t", client_id="c", audience=AUDIENCE, issuer="i")
    return f"Bearer {token}"


@pytest.mark.parametrize(
    ("offset", "code"),
    [(2 * 3600.0, "InvalidAuthenticationToken"), (-2 * 3600.0, "ExpiredAuthenticationToken")],
)
def test_a_token_issued_while_the_clock_is_off_is_refused(offset: float, code: str) -> None:
    issuer = _issuer()
    issuer.clock_offset = offset
    off = _bearer(issuer)
    with pytest.raises(TokenRejectedError) as refused:
        issuer.verify(off)
    assert code == refused.value.code
    issuer.clock_offset = 0.0
    assert "c" == issuer.verify(_bearer(issuer))["appid"]
