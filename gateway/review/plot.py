"""Geometry of the case page's risk-over-time plot; templates/_plot.html draws it as inline SVG.

Numbers only here: the template (autoescaped) renders every text, so no markup is built in Python.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

W, H, PAD_L, PAD_R, PAD_T, PAD_B = 720, 220, 44, 16, 12, 34
ACTION_COLOURS = {"ALLOW": "#6b7280", "REVIEW": "#d97706", "CHALLENGE": "#ea580c", "BLOCK": "#dc2626"}


def _utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M")


@dataclass
class RiskPlot:
    width: int = W
    height: int = H
    left: int = PAD_L
    right: int = W - PAD_R
    grid: list = field(default_factory=list)        # [(y, "0.5"), ...]
    line: str = ""                                  # polyline points "x,y x,y ..."
    dots: list = field(default_factory=list)        # [(x, y, colour, tooltip), ...]
    start: str = ""
    end: str = ""


def risk_plot(points: list[tuple[int, float, str, str]]) -> RiskPlot | None:
    """points: (ts ms, risk 0..1, action, label) oldest first; None when there is nothing to draw."""
    if not points:
        return None
    t0, t1 = points[0][0], points[-1][0]
    plot_w, plot_h = W - PAD_L - PAD_R, H - PAD_T - PAD_B

    def xy(ts: int, risk: float) -> tuple[float, float]:
        x = PAD_L + (plot_w / 2 if t1 == t0 else (ts - t0) / (t1 - t0) * plot_w)
        return round(x, 1), round(PAD_T + (1 - min(max(risk, 0.0), 1.0)) * plot_h, 1)

    p = RiskPlot(start=f"{_utc(t0)} UTC", end=f"{_utc(t1)} UTC")
    p.grid = [(xy(t0, level)[1], f"{level:.1f}") for level in (0.0, 0.5, 1.0)]
    coords = [xy(ts, risk) for ts, risk, _, _ in points]
    p.line = " ".join(f"{x},{y}" for x, y in coords)
    p.dots = [(x, y, ACTION_COLOURS.get(action, "#111827"),
               f"{_utc(ts)} UTC  risk {risk:.3f}  {action}  {label}".strip())
              for (x, y), (ts, risk, action, label) in zip(coords, points)]
    return p
