"""tools/coupling_figure.py: the README figure's groups come from discovery and the PNG is written."""

from __future__ import annotations

from tools.coupling_figure import draw, layer_groups


def test_one_layer_has_one_group_per_kind_and_the_png_is_written(tmp_path):
    groups = layer_groups()
    assert sorted(g.kind for g in groups) == ["ffn", "qk", "vo"]
    out = draw(groups, tmp_path / "coupling.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
