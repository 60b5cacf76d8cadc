"""Review app settings (kept apart from app.py so the CLI's --help imports no web framework)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReviewConfig:
    host: str = "127.0.0.1"             # loopback by default: put it behind TLS before exposing it
    port: int = 8088
    scan_alerts: int = 20_000           # newest alerts read per page view (the queue is a window, cases.py)
    page_size: int = 200                # rows shown in the queue
    hold_days: int = 30                 # the hold form's default expiry
    redis_timeout_s: float = 2.0        # people wait for pages, not payments: longer than the gateway's 50 ms
