"""tools/zoo_table.py: the README's "Supported architectures" table is generated from tests/zoo and up to date."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tests.zoo import ALL_CASES

ROOT = Path(__file__).resolve().parents[2]


def _tool():
    spec = importlib.util.spec_from_file_location("zoo_table", ROOT / "tools" / "zoo_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_table_is_up_to_date():
    tool = _tool()
    readme = tool.README.read_text(encoding="utf-8")
    assert tool.replaced(readme, tool.table()) == readme, "run: python tools/zoo_table.py --write"


def test_one_row_per_zoo_case_with_expected_group_counts():
    rows = _tool().table().splitlines()[2:]
    assert len(rows) == len(ALL_CASES)
    qwen3 = next(r for r in rows if r.startswith("| `hf_qwen3`"))
    assert "Qwen3ForCausalLM" in qwen3 and "2 / 2 / 2" in qwen3 and qwen3.split(" | ")[5] == "-"
    mixtral = next(r for r in rows if r.startswith("| `hf_mixtral`"))
    assert "2 / 2 / 2" in mixtral and mixtral.split(" | ")[5] == "-"
    assert all(r.count(" | ") == 6 for r in rows)  # no stray pipes inside cells
