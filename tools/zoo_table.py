"""The README's "Supported architectures" table, generated from the test zoo (``tests/zoo``).

    python tools/zoo_table.py            # print the table (Markdown)
    python tools/zoo_table.py --write    # replace the table between the markers in README.md
    python tools/zoo_table.py --check    # exit 1 when README.md's table is not what the zoo gives

Each row is one zoo case: the model (Hugging Face class, or the hand-written block), its attention layout
and rotary embedding, the coupled groups discovery must find per kind (asserted with parameter shapes and
the mask oracle at several sparsities by ``tests/ecospa_fx/test_compress_zoo.py``), and what stays dense.
``tests/tools/test_zoo_table.py`` fails when the README table is stale.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
START, END = "<!-- zoo-table:start (tools/zoo_table.py --write) -->", "<!-- zoo-table:end -->"
HEADER = (
    "| case | model | attention | rotary | groups qk / vo / ffn | left dense | exercises |\n"
    "|---|---|---|---|---|---|---|"
)


def model_name(case) -> str:
    """The Hugging Face class of a zoo case, or the hand-written block class (``PlainMlp`` for the MLP)."""
    build = case.build
    if getattr(build, "args", None):
        return build.args[0].__name__
    block = inspect.getclosurevars(build).nonlocals.get("block_cls")
    if block is not None:
        return block.__name__
    return re.sub(r"^hw_", "", case.name).title().replace("_", "")


def attention(meta: dict) -> str:
    if meta.get("attention"):  # a layout the head counts do not name (multi-head latent attention)
        return meta["attention"]
    heads, kv = meta.get("heads", 0), meta.get("kv_heads", 0)
    if not heads:
        return "none"
    layout = "MHA" if kv == heads else ("MQA" if kv == 1 else f"GQA {heads}q/{kv}kv")
    return f"{layout}, head_dim {meta.get('head_dim')}"


def left_dense(case) -> str:
    """Kinds discovery must leave dense in a model that has them, and why (from the case's shape facts)."""
    meta, out = case.meta, []
    if meta.get("heads") and not case.expected("qk"):
        out.append("qk" + (f" ({meta['qk_norm']})" if meta.get("qk_norm") else ""))
    if meta.get("ffn") and not case.expected("ffn"):
        out.append("ffn" + (f" ({meta['experts']} routed experts)" if meta.get("experts") else ""))
    return "; ".join(out) or "-"


def exercises(case, limit: int = 100) -> str:
    """The first clause of the case's notes after its shape line (and the shared MHA explanation)."""
    text = re.sub(r"^L=.*?rotary=.*?\. ", "", case.notes, count=1)
    text = re.sub(r"^No rotary, MHA -> [^.]*\. ", "", text)
    clause = re.split(r"; |(?<=[a-z]) -> |(?<=[a-z0-9)\]])\. ", text, maxsplit=1)[0].strip().rstrip(".")
    if len(clause) > limit:
        clause = clause[:limit].rsplit(" ", 1)[0] + " ..."
    return clause


def row(case) -> str:
    meta = case.meta
    groups = " / ".join(str(case.expected(k)) for k in ("qk", "vo", "ffn"))
    if case.expected("latent"):
        groups += f" + {case.expected('latent')} latent"
    cells = [
        f"`{case.name}`",
        model_name(case),
        attention(meta),
        meta.get("rotary") or "-",
        groups,
        left_dense(case),
        exercises(case),
    ]
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def table() -> str:
    sys.path.insert(0, str(ROOT))  # tests.zoo lives in the repository, not in the installed package
    from tests.zoo import ALL_CASES

    return "\n".join([HEADER, *(row(c) for c in ALL_CASES)])


def replaced(readme: str, body: str) -> str:
    if START not in readme or END not in readme:
        raise SystemExit(f"zoo_table: {README} has no {START} ... {END} markers")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{body}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="zoo_table", description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the table in README.md")
    mode.add_argument("--check", action="store_true", help="exit 1 when README.md's table is stale")
    args = p.parse_args(argv)
    body = table()
    if not (args.write or args.check):
        print(body)
        return 0
    readme = README.read_text(encoding="utf-8")
    new = replaced(readme, body)
    if args.check:
        if new != readme:
            print("zoo_table: README.md's table is stale: run python tools/zoo_table.py --write", file=sys.stderr)
            return 1
        return 0
    README.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
