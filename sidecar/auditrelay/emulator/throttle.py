"""The per-rule ingestion limits: requests per minute and bytes per minute, as token buckets."""

from __future__ import annotations

import time


class _Bucket:
    """A token bucket refilled continuously: ``per_minute`` units, at most ``per_minute`` held."""

    def __init__(self, per_minute: int) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = float(per_minute)
        self.stamp = time.monotonic()

    def shortfall(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` is available (0: available now)."""
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        amount = min(amount, self.capacity)
        return 0.0 if self.level >= amount else (amount - self.level) / self.rate


class Throttle:
    """The per-rule limits: requests per minute and bytes per minute."""

    def __init__(self, requests_per_minute: int, bytes_per_minute: int) -> None:
        self._limits = (requests_per_minute, bytes_per_minute)
        self._buckets: dict[str, tuple[_Bucket, _Bucket]] = {}

    def admit(self, dcr: str, wire_bytes: int) -> float:
        """0 if the request may go on (and is counted), else the seconds to wait."""
        requests, volume = self._buckets.setdefault(
            dcr, (_Bucket(self._limits[0]), _Bucket(self._limits[1]))
        )
        now = time.monotonic()
        wait = max(requests.shortfall(1, now), volume.shortfall(wire_bytes, now))
        if wait == 0.0:
            requests.level -= 1
            volume.level -= min(wire_bytes, volume.capacity)
        return wait
