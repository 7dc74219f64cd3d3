"""Run the fuzz properties over many generated models without stopping at the first failure.

    PYTHONPATH=. python -m tests.fuzz.explore --examples 200 --seed 7 [--onnx-every 10]

Prints one line per failing example (its spec code, property and message) and a tally at the end; the
hypothesis test (tests/fuzz/test_fuzz_architectures.py) is what CI runs and what shrinks a failure.
"""

from __future__ import annotations

import argparse
import collections
import time
import traceback

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from tests.fuzz.generator import build, specs
from tests.fuzz.properties import (
    PropertyFailure,
    check_discovery_and_identity,
    check_onnx,
    check_oracle,
    check_renamed,
    known_crash,
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--onnx-every", type=int, default=0, help="export every k-th example to ONNX (0: never)")
    args = ap.parse_args()
    tally: collections.Counter = collections.Counter()
    failures = []
    start = time.time()

    @seed(args.seed)
    @settings(
        max_examples=args.examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(spec=specs(), sparsity=st.floats(0.0, 0.89), granularity=st.sampled_from(["channel", "head"]))
    def run(spec, sparsity, granularity):
        n = tally["ok"] + sum(v for k, v in tally.items() if k.startswith("fail:"))
        stage = "build"
        try:
            built = build(spec)
            stage = "discovery"
            for bug in check_discovery_and_identity(built):
                tally[f"known: {bug}"] += 1
            stage = "oracle"
            try:
                compressed = check_oracle(built, sparsity, granularity)
            except PropertyFailure as err:
                bug = known_crash(spec, granularity, err)
                if bug is None:
                    raise
                tally[f"known: {bug}"] += 1
                tally["ok"] += 1
                return
            stage = "renamed"
            check_renamed(built, sparsity, granularity, compressed)
            if args.onnx_every and n % args.onnx_every == 0:
                stage = "onnx"
                tally[f"onnx {check_onnx(built, compressed)}"] += 1
            tally["ok"] += 1
        except Exception as err:
            tally[f"fail:{stage}"] += 1
            msg = str(err) if isinstance(err, AssertionError) else traceback.format_exc(limit=-3)
            failures.append((stage, spec, sparsity, granularity, msg))
            print(f"FAIL [{stage}] sparsity={sparsity:.3f} {granularity}\n{msg}\n  code: {spec.code()}\n", flush=True)

    run()
    ran = tally["ok"] + sum(v for k, v in tally.items() if k.startswith("fail:"))
    print(f"{ran} examples in {time.time() - start:.0f}s: {dict(tally)}")


if __name__ == "__main__":
    main()
