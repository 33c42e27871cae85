"""Fuzz target ``policy``: the audit policy loader on any text (only PolicyError, naming the file),
then the compiled policy deciding requests the fuzzer made up."""

from __future__ import annotations

import atheris
from auditrelay.errors import PolicyError
from auditrelay.policy import Level, RequestAttributes, compile_policy, parse_policy

STAGES = ("RequestReceived", "ResponseStarted", "ResponseComplete", "Panic")


def fuzz(data: bytes) -> None:
    """The policy loader on any text; a policy it accepts must then decide any request."""
    fdp = atheris.FuzzedDataProvider(data)
    text = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, len(data)))
    try:
        policy = parse_policy(text, source="fuzzed.yaml")
    except PolicyError as error:
        assert str(error).startswith("fuzzed.yaml: ")
        return
    assert policy.rules
    compiled = compile_policy(policy, cache_size=4)
    for _ in range(3):
        user = None if fdp.ConsumeBool() else fdp.ConsumeUnicodeNoSurrogates(10)
        request = RequestAttributes(
            user=user,
            groups=tuple(fdp.ConsumeUnicodeNoSurrogates(10) for _ in range(2)),
            verb=fdp.ConsumeUnicodeNoSurrogates(8),
            namespace=fdp.ConsumeUnicodeNoSurrogates(8),
            api_group=fdp.ConsumeUnicodeNoSurrogates(8),
            resource=fdp.ConsumeUnicodeNoSurrogates(8),
            subresource=fdp.ConsumeUnicodeNoSurrogates(8),
            name=fdp.ConsumeUnicodeNoSurrogates(8),
            path=fdp.ConsumeUnicodeNoSurrogates(20),
            resource_request=fdp.ConsumeBool(),
        )
        decision = compiled.decide(request)
        assert isinstance(decision.level, Level)
        assert decision.omit_stages <= frozenset(STAGES)
