"""Ranks started the way torchrun starts them (environment variables, one process per rank), each
running one of the worker scripts beside this file: ``ddp_worker.py`` (DistributedDataParallel) or
``fsdp_worker.py`` (FSDP2). Used by tests/runtime/test_distributed.py and test_fsdp.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

DDP_WORKER = Path(__file__).with_name("ddp_worker.py")
FSDP_WORKER = Path(__file__).with_name("fsdp_worker.py")

needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with the gloo backend",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(worker: Path, tmp_path: Path, before: list[str], after: list[str], world: int = 2) -> list[dict]:
    """Run ``world`` ranks of ``worker LOGDIR *before RESULT_JSON *after`` the way torchrun
    starts them; their result dicts, by rank."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(worker), str(tmp_path / "run"), *before, str(tmp_path / f"r{rank}.json"), *after],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=240)[0])  # a hang (deadlock) fails here
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{out}"
    return [json.loads((tmp_path / f"r{rank}.json").read_text()) for rank in range(world)]
