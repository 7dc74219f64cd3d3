"""Self-check of the model zoo.

    python -m tests.zoo._selfcheck [--decomp] [--ops] [NAME ...]

For every case (or the named ones): build, run eager, export with
``torch.export.export(..., strict=False)``, compare ``ep.module()`` against
eager, check ``renamed()`` computes the same function with only renamed
state-dict keys, export the renamed copy too, and print a table.
``--ops`` prints the distinct ``call_function`` targets of the exported
graphs (with the cases using each); ``--decomp`` also runs
``ep.run_decompositions()`` and lists the core-ATen ops.
Exit status 1 if an expectation fails.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from collections import defaultdict

import torch
import torch.utils._pytree as pytree

from . import ALL_CASES, is_renamed_name, renamed

ATOL = 1e-5


def _leaves(out):
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _maxdiff(a, b) -> float:
    la, lb = _leaves(a), _leaves(b)
    if len(la) != len(lb):
        raise AssertionError(f"output structure differs: {len(la)} vs {len(lb)} tensors")
    d = 0.0
    for x, y in zip(la, lb, strict=True):
        if x.shape != y.shape:
            raise AssertionError(f"shape {tuple(x.shape)} vs {tuple(y.shape)}")
        if x.is_floating_point():
            d = max(d, (x - y).abs().max().item() if x.numel() else 0.0)
        elif not torch.equal(x, y):
            d = float("inf")
    return d


def _ops(ep) -> set[str]:
    """call_function targets of the graph and of nested HOP subgraphs (e.g. wrap_with_set_grad_enabled)."""
    ops = set()
    for gm in ep.graph_module.modules():
        if isinstance(gm, torch.fx.GraphModule):
            ops |= {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    return ops


def check(case, decomp: bool):
    row = {"name": case.name, "expect": case.expect, "skipped": case.skipped_min}
    t0 = time.perf_counter()
    model = case.build()
    args = case.inputs()
    assert not model.training, "zoo models must be in eval mode"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        ref = model(*args)
        again = case.build()(*case.inputs())
    row["params"] = sum(p.numel() for p in model.parameters())
    row["determ"] = _maxdiff(ref, again) == 0.0
    row["ops"], row["core_ops"] = set(), set()
    try:
        ep = torch.export.export(model, args, strict=False)
        with torch.no_grad():
            got = ep.module()(*args)
        row["export"] = _maxdiff(ref, got)
        row["ops"] = _ops(ep)
    except Exception as e:
        row["export"] = f"FAIL {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    row["decomp"] = "-"
    if decomp and isinstance(row["export"], float):
        try:
            dep = ep.run_decompositions()
            row["core_ops"] = _ops(dep)
            with torch.no_grad():
                row["decomp"] = _maxdiff(ref, dep.module()(*args))
        except Exception as e:
            row["decomp"] = f"FAIL {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    rmodel = renamed(model)
    bad = [n for n, _ in rmodel.named_parameters()] + [n for n, _ in rmodel.named_buffers()]
    bad = [n for n in bad if not is_renamed_name(n)]
    with torch.no_grad():
        rout = rmodel(*args)
    row["renamed"] = _maxdiff(ref, rout)
    row["renamed_names_ok"] = not bad
    try:
        rep = torch.export.export(rmodel, args, strict=False)
        with torch.no_grad():
            row["renamed_export"] = _maxdiff(ref, rep.module()(*args))
        sd_bad = [k for k in rep.state_dict if not is_renamed_name(k)]
        row["renamed_names_ok"] &= not sd_bad
    except Exception as e:
        row["renamed_export"] = f"FAIL {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    row["secs"] = time.perf_counter() - t0
    return row


def _fmt(v):
    if isinstance(v, float):
        return "ok" if v <= ATOL else f"{v:.1e}"
    return str(v)


def _close(v) -> bool:
    return isinstance(v, float) and v <= ATOL


def _cell(v) -> str:
    if isinstance(v, str):
        return v if v == "-" else v[:4]  # "FAIL"
    return _fmt(v)


COLS = (
    ("case", 22),
    ("qk", 3),
    ("vo", 3),
    ("ffn", 3),
    ("skip", 4),
    ("params", 7),
    ("det", 4),
    ("export", 8),
    ("renamed", 8),
    ("ren_exp", 8),
    ("names", 5),
    ("decomp", 6),
    ("secs", 5),
)


def _line(cells) -> str:
    first, *rest = zip(cells, COLS, strict=False)
    return f"{first[0]:{first[1][1]}} " + " ".join(f"{c:>{w}}" for c, (_, w) in rest)


def _row_ok(case, r) -> bool:
    return bool(
        r["determ"]
        and _close(r["export"]) == case.exportable
        and _close(r["renamed"])
        and r["renamed_names_ok"]
        and (not case.exportable or _close(r["renamed_export"]))
    )


def _print_ops(rows, key, title) -> None:
    users = defaultdict(list)
    for r in rows:
        for op in r[key]:
            users[op].append(r["name"])
    print(f"\ndistinct call_function targets, {title}: {len(users)}")
    for op in sorted(users):
        u = users[op]
        who = "ALL" if len(u) == len(rows) else ", ".join(u)
        print(f"  {op:55} {len(u):>2}  {who}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="*")
    ap.add_argument("--decomp", action="store_true", help="also run ep.run_decompositions() and list the core-ATen ops")
    ap.add_argument("--ops", action="store_true", help="list exported call_function targets")
    a = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except Exception:
        pass
    torch.set_num_threads(min(2, torch.get_num_threads()))

    cases = [c for c in ALL_CASES if not a.names or c.name in a.names]
    t_all = time.perf_counter()
    rows, failed = [], []
    hdr = _line([name for name, _ in COLS]) + "  exportable"
    print(hdr)
    print("-" * len(hdr))
    for case in cases:
        r = check(case, a.decomp)
        rows.append(r)
        e = r["expect"]
        ok = _row_ok(case, r)
        if not ok:
            failed.append(case.name)
        cells = [
            case.name,
            e.get("qk", 0),
            e.get("vo", 0),
            e.get("ffn", 0),
            r["skipped"],
            r["params"],
            "ok" if r["determ"] else "NO",
            _cell(r["export"]),
            _cell(r["renamed"]),
            _cell(r["renamed_export"]),
            "ok" if r["renamed_names_ok"] else "BAD",
            _cell(r["decomp"]),
            f"{r['secs']:.1f}",
        ]
        print(_line(cells) + f"  {case.exportable}{'' if ok else '  <-- FAIL'}")
        for k in ("export", "renamed_export", "decomp"):
            if isinstance(r[k], str) and r[k] != "-":
                print(f"    {k}: {r[k]}")
    secs = time.perf_counter() - t_all
    print(f"\n{len(rows)} cases in {secs:.1f}s; failures: {failed or 'none'}")

    if a.ops:
        _print_ops(rows, "ops", "exported graph (torch.export default IR)")
    if a.decomp:
        _print_ops(rows, "core_ops", "after run_decompositions()")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
