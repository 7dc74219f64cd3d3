"""Draw the coupled groups ecospa_fx discovers in one decoder layer (README figure).

    PYTHONPATH=. python tools/coupling_figure.py --out docs/coupling.png

Builds the test zoo's tiny GQA Llama (random weights), runs ``ecospa_fx.discover`` (dataflow only, no
names read) and draws, for layer 0, every parameter dimension that belongs to a group as a node and every
group as a coloured star joining its members: Q rows with K rows (qk, rotary pairs whole), V rows with O
columns (vo), gate and up rows with down columns (ffn).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import networkx as nx

import ecospa_fx
from tests.zoo import case_by_name

COLOURS = {"qk": "#1f77b4", "vo": "#2ca02c", "ffn": "#d62728", "latent": "#17becf", "head": "#9467bd"}
AXIS = {0: "rows (out)", 1: "cols (in)"}


def layer_groups(case: str = "hf_llama_gqa", layer: str = "layers.0."):
    built = case_by_name(case)
    report = ecospa_fx.discover(built.build(), built.inputs())
    return [g for g in report.groups if all(layer in m.param for m in g.members)]


def draw(groups, out: Path) -> Path:
    graph, colours, labels = nx.Graph(), {}, {}
    for index, group in enumerate(groups):
        hub = f"{group.kind}#{index}"
        graph.add_node(hub)
        colours[hub], labels[hub] = COLOURS.get(group.kind, "grey"), f"{group.kind}\n{group.units} units"
        for m in group.members:
            if m.param.endswith(".bias"):
                continue
            node = f"{m.param}[{m.dim}]"
            short = ".".join(m.param.split(".")[-2:-1])
            graph.add_edge(hub, node)
            colours[node], labels[node] = "#f0f0f0", f"{short}\n{AXIS.get(m.dim, m.dim)} {m.size}"
    pos = _columns(graph, [h for h in graph.nodes if "#" in h])
    fig, ax = plt.subplots(figsize=(9, 4.2))
    nodes = list(graph.nodes)
    nx.draw_networkx_edges(graph, pos, ax=ax, edge_color="#888888")
    nx.draw_networkx_nodes(
        graph,
        pos,
        ax=ax,
        nodelist=nodes,
        node_color=[colours[n] for n in nodes],
        node_size=[1900 if "#" in n else 1500 for n in nodes],
        edgecolors="#444444",
    )
    nx.draw_networkx_labels(graph, pos, labels, ax=ax, font_size=7)
    ax.set_title("Coupled groups discovered from dataflow in one Llama (GQA, RoPE, SwiGLU) layer")
    ax.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _columns(graph: nx.Graph, hubs: list[str]) -> dict[str, tuple[float, float]]:
    """One column per group: the hub in the middle, its members spread on a row above and below it."""
    pos = {}
    for col, hub in enumerate(hubs):
        pos[hub] = (3.0 * col, 0.0)
        members = sorted(graph.neighbors(hub))
        for k, node in enumerate(members):
            side = 1.0 if k % 2 == 0 else -1.0
            shift = (k // 2 - (len(members) - 1) / 4) * 1.2
            pos[node] = (3.0 * col + shift, side)
    return pos


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/coupling.png"))
    parser.add_argument("--case", default="hf_llama_gqa", help="a tests/zoo case name")
    args = parser.parse_args(argv)
    print(draw(layer_groups(args.case), args.out))


if __name__ == "__main__":
    main()
