"""Two gloo ranks under DDP and under FSDP2 prune identically, and like one process on the same global batches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from . import ddp_worker

ROOT = Path(__file__).resolve().parents[3]
WORKER = "tests.ecospa_fx.training.ddp_worker"
ENGINES = ("ddp", "fsdp")


def _spawn(tmp_path: Path) -> None:
    """Two ranks (one process each), each training under DDP then under FSDP2."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    rendezvous = f"file://{tmp_path}/rendezvous"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", WORKER, str(r), "2", rendezvous, str(tmp_path), ",".join(ENGINES)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out.decode()[-3000:]


def test_two_gloo_ranks_match_each_other_and_one_process(tmp_path):
    _spawn(tmp_path)
    ddp_worker.run(0, 1, str(tmp_path), "single")
    ref = torch.load(tmp_path / "single0.pt")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert ref[q].shape == (16, 32)  # half the head_dim
    for engine in ENGINES:
        rank0, rank1 = (torch.load(tmp_path / f"{engine}{r}.pt") for r in range(2))
        assert rank0.keys() == rank1.keys() == ref.keys()
        for name in ref:
            assert torch.equal(rank0[name], rank1[name]), (engine, name)  # ranks identical bit for bit
            assert rank0[name].shape == ref[name].shape, (engine, name)
            assert torch.allclose(rank0[name], ref[name], atol=1e-5, rtol=1e-4), (engine, name)
