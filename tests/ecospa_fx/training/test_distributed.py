"""Two gloo ranks under DDP prune identically, and exactly like one process on the same global batches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from . import ddp_worker

ROOT = Path(__file__).resolve().parents[3]


def _spawn(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    rendezvous = f"file://{tmp_path}/rendezvous"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.ecospa_fx.training.ddp_worker", str(r), "2", rendezvous, str(tmp_path)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out.decode()[-3000:]


def test_two_gloo_ranks_match_each_other_and_one_process(tmp_path):
    _spawn(tmp_path)
    single = tmp_path / "single"
    single.mkdir()
    ddp_worker.run(0, 1, "", str(single))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    ref = torch.load(single / "rank0.pt")
    assert rank0.keys() == rank1.keys() == ref.keys()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert rank0[q].shape == (16, 32)  # pruned to half the head_dim on every rank
    for name in ref:
        assert torch.equal(rank0[name], rank1[name]), name  # ranks identical bit for bit
        assert rank0[name].shape == ref[name].shape, name
        assert torch.allclose(rank0[name], ref[name], atol=1e-5, rtol=1e-4), name
