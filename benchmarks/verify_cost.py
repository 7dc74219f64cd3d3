"""What verification costs: ``compress`` with verify off, with the mask oracle on the example inputs only
(``PROBES = 0``, the behaviour before issue 13), and with the default seeded probes, timed round robin in
one run on the packaged all-MiniLM-L6-v2 (no hub).

    python benchmarks/verify_cost.py [--rounds 3] [--batch 8] [--seq 128]

Prints wall seconds per setting (median over rounds) and the ratio to verify off.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch

import ecospa_fx
import passes.verify as verify
from ecospa_fx.demo import load_minilm

SETTINGS = {"verify off": (False, 0), "example only": (True, 0), f"example + {verify.PROBES} probes": (True, None)}


def _run(model, inputs, on: bool, probes: int | None) -> float:
    default = verify.PROBES
    verify.PROBES = default if probes is None else probes
    try:
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ecospa_fx.compress(model, inputs, 0.5, verify=on)
        return time.perf_counter() - start
    finally:
        verify.PROBES = default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, _, _ = load_minilm()
    model.eval()
    ids = torch.randint(1000, 20000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    inputs = (ids, torch.ones_like(ids))
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):
        for name, (on, probes) in SETTINGS.items():
            times[name].append(_run(model, inputs, on, probes))
    base = statistics.median(times["verify off"])
    print(
        f"all-MiniLM-L6-v2, compress 50%, inputs {args.batch}x{args.seq}, {args.rounds} rounds, "
        f"load {os.getloadavg()[0]:.1f}"
    )
    print("| setting | compress s (median) | x verify off |\n|---|---:|---:|")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"| {name} | {med:.2f} | {med / base:.2f} |")


if __name__ == "__main__":
    main()
