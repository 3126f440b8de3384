"""Training stages on several processes: torchrun launched and supervised by the stage's Prefect task.

The task pickles its job (store, data, config) to a temporary file and runs
``python -m torch.distributed.run --standalone --nproc-per-node=N -m <stage module> <job>``; every rank
unpickles the job and trains its share (`world_from_env`), rank 0 writes checkpoints and outputs. The
task relays the group's output to Prefect's log; a group that fails raises ChildProcessError — an OSError,
so an infrastructure failure that Prefect retries, and the retry resumes from the last checkpoint.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import torch

from nextdetail.errors import UserError


def world_from_env() -> tuple[int, int, int]:
    """(rank, world, local_rank) as torchrun sets them; (0, 1, 0) in a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def process_count(nproc: int | None, device: str) -> int:
    """`nproc`, or one per visible GPU when None (1 on CPU)."""
    if nproc is not None:
        return nproc
    return max(1, torch.cuda.device_count()) if device == "cuda" else 1


def join(device: str, section: str) -> tuple[int, int, torch.device]:
    """This process's (rank, world, device): its own GPU under torchrun (`LOCAL_RANK`), and the process group
    joined (NCCL on GPUs, gloo on CPU) when there is more than one rank. `section`: the config section whose
    `device` asked for it (for the error)."""
    rank, world, local_rank = world_from_env()
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{section}.device=cuda but no CUDA device is visible; use -o {section}.device=cpu")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return rank, world, dev


def launch(stage: str, module: str, job: dict[str, Any], nproc: int, log: Callable[[str], None]) -> None:
    """Run `module`'s `__main__` on `nproc` ranks under torchrun with `job`; relay their output."""
    with tempfile.TemporaryDirectory(prefix=f"nextdetail-{stage}-") as tmp:
        path = os.path.join(tmp, "job.pkl")
        with open(path, "wb") as f:
            pickle.dump(job, f)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", module, path]
        log(f"{stage}: launching {nproc} processes: {' '.join(cmd)}")
        # Its own session: a terminal's Ctrl-C reaches the CLI alone, which ends torchrun and its ranks together.
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            log(line.rstrip())
        if proc.wait() != 0:
            raise ChildProcessError(f"{stage}: torchrun exited with {proc.returncode}; the retry resumes from the "
                                    "last checkpoint")


def read_job(path: str) -> dict[str, Any]:
    with open(path, "rb") as f:
        return pickle.load(f)


def leave_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """All-reduce the gradients of `params` as one flat buffer and divide by `world` (a missing gradient
    counts as zeros, so every rank flattens the same layout)."""
    if world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    torch.distributed.all_reduce(flat)
    flat.div_(world)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
        offset += n
