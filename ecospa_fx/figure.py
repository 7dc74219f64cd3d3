"""Figures of a report: kept width per layer and kind, as a self-contained HTML page (inline SVG bars and
the summary) and as a PNG (matplotlib, Agg backend)."""

from __future__ import annotations

import html
from pathlib import Path

from ecospa_fx.report import Report

COLOURS = {"qk": "#4e79a7", "vo": "#f28e2b", "ffn": "#59a14f", "latent": "#76b7b2", "head": "#b07aa1"}
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
        bars.append(
            f'<rect x="{x}" y="{MARGIN + HEIGHT - h:.1f}" width="{BAR_W}" height="{h:.1f}" '
            f'fill="{COLOURS.get(kind, "#999")}"><title>{tip}</title></rect>'
        )
    legend = " ".join(
        f'<span style="color:{c}">&#9632; {k}</span>' for k, c in COLOURS.items() if any(r[1] == k for r in rows)
    )
    axis = (
        f'<line x1="{MARGIN}" y1="{MARGIN + HEIGHT}" x2="{width - MARGIN}" y2="{MARGIN + HEIGHT}" '
        f'stroke="#333"/><text x="4" y="{MARGIN + 4}" font-size="10">100%</text>'
        f'<text x="4" y="{MARGIN + HEIGHT}" font-size="10">0%</text>'
    )
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{HEIGHT + 2 * MARGIN}">'
        f"{axis}{''.join(bars)}</svg>"
    )
    summary = html.escape(report.summary())
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
        f"<body style='font-family:sans-serif'><h2>{html.escape(title)}: kept width per group "
        f"(layer order)</h2><p>{legend}</p>{svg}<pre>{summary}</pre></body></html>"
    )


def write_figure(report: Report, path: str | Path, title: str = "ecospa_fx") -> Path:
    out = Path(path)
    out.write_text(render_html(report, title), encoding="utf-8")
    return out


def layer_index(layer: str, fallback: int) -> int:
    """``model.layers.3.self_attn`` -> 3 (the first integer in the module path), else ``fallback``."""
    numbers = [int(p) for p in layer.split(".") if p.isdigit()]
    return numbers[0] if numbers else fallback


def kept_widths(report: Report) -> dict[str, list[tuple[str, int, int]]]:
    """kind -> [(layer label, dense width, kept width)] in layer order, the width of a group being its widest
    member's channels along the pruned dimension (e.g. FFN channels, or heads x head_dim). Labels are layer
    indices, prefixed by the stack (``encoder.0``, ``decoder.0``) where indices repeat."""
    out: dict[str, list[tuple[str, int, int]]] = {}
    for kind in dict.fromkeys(g.kind for g in report.groups):
        groups = [g for g in report.groups if g.kind == kind and g.members]
        labels = _labels([g.layer for g in groups])
        out[kind] = [
            (label, max(m.size for m in g.members), max(g.members, key=lambda m: m.size).kept)
            for label, g in zip(labels, groups, strict=True)
        ]
    return out


def _labels(layers: list[str]) -> list[str]:
    """Short distinct labels: the layer index; then the stack (``decoder.0``); then the module
    (``decoder.0 EncDecAttention``) while labels repeat."""
    idx = [str(layer_index(layer, i)) for i, layer in enumerate(layers)]
    stacked = [f"{layer.split('.')[0]}.{i}" for layer, i in zip(layers, idx, strict=True)]
    named = [f"{s} {_after_index(layer)}" for layer, s in zip(layers, stacked, strict=True)]
    return next((c for c in (idx, stacked, named) if len(set(c)) == len(c)), layers)


def _after_index(layer: str) -> str:
    parts = layer.split(".")
    first = next((k for k, p in enumerate(parts) if p.isdigit()), len(parts) - 1)
    return ".".join(parts[first + 1 :])


def render_png(report: Report, path: str | Path, title: str = "ecospa_fx") -> Path:
    """One panel per kind: dense width (light) and kept width (solid) per layer, labelled in channels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = kept_widths(report)
    kinds = list(widths) or ["none"]
    fig, axes = plt.subplots(
        len(kinds), 1, figsize=(max(6.0, 0.35 * _layers(widths) + 2), 2.2 * len(kinds) + 0.8), squeeze=False
    )
    for ax, kind in zip(axes[:, 0], kinds, strict=True):
        rows = widths.get(kind, [])
        xs = list(range(len(rows)))
        ax.bar(xs, [r[1] for r in rows], color="#dddddd", label="dense", width=0.8)
        ax.bar(xs, [r[2] for r in rows], color=COLOURS.get(kind, "#999999"), label="kept", width=0.8)
        ax.set_ylabel(f"{kind} width")
        ax.set_xticks(xs, [r[0] for r in rows], rotation=0 if all(r[0].isdigit() for r in rows) else 45, fontsize=7)
        ax.legend(loc="lower right", fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    axes[-1, 0].set_xlabel("layer")
    ratio = report.params_after / report.params_before if report.params_before else 1.0
    fig.suptitle(
        f"{title}: kept width per layer ({report.granularity}, sparsity {report.sparsity:g}, params {ratio:.2f}x)",
        fontsize=10,
    )
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _layers(widths: dict[str, list[tuple[str, int, int]]]) -> int:
    return max((len(v) for v in widths.values()), default=1)


def write_figures(report: Report, directory: str | Path, title: str = "ecospa_fx") -> tuple[Path, Path]:
    """``report.html`` (inline SVG and the summary) and ``report.png`` (matplotlib) in ``directory``."""
    directory = Path(directory)
    return write_figure(report, directory / "report.html", title), render_png(report, directory / "report.png", title)
