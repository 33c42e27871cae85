"""What a pipeline learns of the endpoint's size limit from its answers (request_limits).

The deliverer's use of it, with a scripted endpoint under either reading, is in test_deliver.py;
the real SDK against the emulator in tests/integration/test_delivery.py.
"""

from __future__ import annotations

from auditrelay.request_limits import RequestLimits, SizeReading

MIB = 1_048_576


def test_a_413_that_raw_size_cannot_explain_is_no_evidence() -> None:
    """A 413 for a body already under 1 MiB raw (an endpoint with a lower limit) or over the
    wire limit is not evidence of the uncompressed reading (the deliverer just halves the
    body); one under the wire limit and over 1 MiB raw is, once."""
    limits = RequestLimits(32 << 20, wire_bytes=MIB)
    said = ("413", "HTTP 413 ContentLengthLimitExceeded")
    assert limits.refused(500_000, MIB, *said) is None
    assert limits.refused(MIB + 1, 9 * MIB, *said) is None
    assert (SizeReading.UNKNOWN, 32 << 20) == (limits.reading, limits.raw_bytes)
    evidence = limits.refused(MIB, MIB + 1, *said)
    assert evidence is not None
    assert limits.refused(MIB, MIB + 1, *said) is None  # once


def test_a_bound_of_1_mib_or_less_never_probes() -> None:
    """max_request_raw_bytes at or under 1 MiB: no body can be refused for its raw size, so
    nothing waits for a probe."""
    limits = RequestLimits(MIB)
    assert not limits.needs_probe(MIB)
    assert limits.too_large(MIB + 1)


def test_a_204_for_a_large_body_settles_the_wire_reading() -> None:
    """A body over 1 MiB raw delivered: the wire reading, no more probing; a smaller one
    proves nothing."""
    limits = RequestLimits(32 << 20)
    limits.accepted(MIB)
    assert limits.needs_probe(MIB + 1)
    limits.accepted(MIB + 1)
    assert (SizeReading.WIRE, False) == (limits.reading, limits.needs_probe(MIB + 1))
    evidence = limits.refused(MIB, 2 * MIB, "413", "ContentLengthLimitExceeded")
    assert evidence is not None  # the endpoint changed its mind: the evidence still counts
    assert (SizeReading.UNCOMPRESSED, MIB) == (limits.reading, limits.raw_bytes)
