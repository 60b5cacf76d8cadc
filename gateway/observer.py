"""What the scoring pipeline reports as it runs (gateway/metrics.py GatewayMetrics implements it).

The engine and the state store call these named hooks explicitly, when one is given, so the
pipeline stays free of any metrics library and its types stay what they are.
"""
from __future__ import annotations

from typing import Protocol, Sequence


class PipelineObserver(Protocol):
    def redis_round_trip(self, op: str, seconds: float) -> None:
        """One batch read ("load") or compare-and-set write ("save") of the state store."""

    def encoder_request(self, seconds: float) -> None:
        """One request to the step encoder (Triton, or the local standby)."""

    def batch_scored(self, n_events: int, results: Sequence) -> None:
        """One engine batch answered (ScoreResults, OK or DEGRADED)."""

    def fallback_answers(self, n: int) -> None:
        """Fallback answers given without scoring (a deadline passed, an internal error)."""
