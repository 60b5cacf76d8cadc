"""The case page's risk-over-time plot as inline SVG (no image files, no plotting library per request)."""
from __future__ import annotations

from datetime import datetime, timezone

from markupsafe import Markup, escape

W, H, PAD_L, PAD_R, PAD_T, PAD_B = 720, 220, 44, 16, 12, 34
ACTION_COLOURS = {"ALLOW": "#6b7280", "REVIEW": "#d97706", "CHALLENGE": "#ea580c", "BLOCK": "#dc2626"}


def _utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M")


def risk_svg(points: list[tuple[int, float, str, str]]) -> Markup:
    """points: (ts ms, risk 0..1, action, label text) oldest first -> an <svg> element."""
    if not points:
        return Markup("")
    t0, t1 = points[0][0], points[-1][0]
    span = max(t1 - t0, 1)
    plot_w, plot_h = W - PAD_L - PAD_R, H - PAD_T - PAD_B

    def xy(ts: int, risk: float) -> tuple[float, float]:
        x = PAD_L + (plot_w / 2 if t1 == t0 else (ts - t0) / span * plot_w)
        return x, PAD_T + (1 - min(max(risk, 0.0), 1.0)) * plot_h

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" '
             'role="img" aria-label="risk over time" class="riskplot">']
    for level in (0.0, 0.5, 1.0):
        _, y = xy(t0, level)
        parts.append(f'<line x1="{PAD_L}" y1="{y:.1f}" x2="{W - PAD_R}" y2="{y:.1f}" stroke="#e5e7eb"/>'
                     f'<text x="{PAD_L - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{level:.1f}</text>')
    coords = [xy(ts, risk) for ts, risk, _, _ in points]
    parts.append('<polyline fill="none" stroke="#2563eb" stroke-width="1.5" points="'
                 + " ".join(f"{x:.1f},{y:.1f}" for x, y in coords) + '"/>')
    for (x, y), (ts, risk, action, label) in zip(coords, points):
        tip = escape(f"{_utc(ts)} UTC  risk {risk:.3f}  {action}  {label}".strip())
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{ACTION_COLOURS.get(action, "#111")}">'
                     f'<title>{tip}</title></circle>')
    parts.append(f'<text x="{PAD_L}" y="{H - 10}" font-size="11">{_utc(t0)} UTC</text>'
                 f'<text x="{W - PAD_R}" y="{H - 10}" font-size="11" text-anchor="end">{_utc(t1)} UTC</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
