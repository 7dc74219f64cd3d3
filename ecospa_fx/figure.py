"""A self-contained HTML figure of a report: kept width per layer and kind, as inline SVG bars."""

from __future__ import annotations

import html
from pathlib import Path

from ecospa_fx.report import Report

COLOURS = {"qk": "#4e79a7", "vo": "#f28e2b", "ffn": "#59a14f", "head": "#b07aa1"}
BAR_W, GAP, HEIGHT, MARGIN = 14, 4, 180, 40


def kept_fractions(report: Report) -> list[tuple[str, str, float]]:
    """(layer, kind, kept units / units) in report order."""
    return [(g.layer, g.kind, 1 - g.units_removed / g.units if g.units else 1.0) for g in report.groups]


def render_html(report: Report, title: str = "ecospa_fx") -> str:
    rows = kept_fractions(report)
    width = MARGIN * 2 + len(rows) * (BAR_W + GAP)
    bars = []
    for i, (layer, kind, frac) in enumerate(rows):
        x = MARGIN + i * (BAR_W + GAP)
        h = frac * HEIGHT
        tip = html.escape(f"{layer} {kind}: {frac:.0%} kept")
        bars.append(f'<rect x="{x}" y="{MARGIN + HEIGHT - h:.1f}" width="{BAR_W}" height="{h:.1f}" '
                    f'fill="{COLOURS.get(kind, "#999")}"><title>{tip}</title></rect>')
    legend = " ".join(f'<span style="color:{c}">&#9632; {k}</span>' for k, c in COLOURS.items()
                      if any(r[1] == k for r in rows))
    axis = (f'<line x1="{MARGIN}" y1="{MARGIN + HEIGHT}" x2="{width - MARGIN}" y2="{MARGIN + HEIGHT}" '
            f'stroke="#333"/><text x="4" y="{MARGIN + 4}" font-size="10">100%</text>'
            f'<text x="4" y="{MARGIN + HEIGHT}" font-size="10">0%</text>')
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{HEIGHT + 2 * MARGIN}">'
           f'{axis}{"".join(bars)}</svg>')
    summary = html.escape(report.summary())
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
            f"<body style='font-family:sans-serif'><h2>{html.escape(title)}: kept width per group "
            f"(layer order)</h2><p>{legend}</p>{svg}<pre>{summary}</pre></body></html>")


def write_figure(report: Report, path: str | Path, title: str = "ecospa_fx") -> Path:
    out = Path(path)
    out.write_text(render_html(report, title), encoding="utf-8")
    return out
