"""One training loop for both training stages (`train_tokenizer`, `train_ar`).

The loop owns what every training must do the same way: join the process group (torchrun), set torch's
threads (and restore them), resume from the newest step checkpoint, show progress, refuse a non-finite
loss, log every `log_every` steps, checkpoint every `checkpoint_every` steps (then a barrier), leave early
with `stop_after` (tests: an interrupted run), and on rank 0 write the outputs and `summary.json`. It also
holds the stage's task body (one process, torchrun on this machine, or torchrun on several hosts' Dask workers,
supervised by the Prefect task) and the torchrun entry (`python -m nextdetail.pipeline.training JOB`).

A stage supplies a `Training`: its model and optimizer (`build`), its batches, one optimisation step, what
its checkpoint holds beyond the step and metrics, its log line and its outputs — and its job (`to_job`,
`from_job`): what rebuilds it in a rank from JSON, by the stage's name in `TRAININGS`.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from nextdetail.errors import UserError
from nextdetail.pipeline.torchrun import (
    die_with_parent,
    gather_nodes,
    join,
    launch,
    launch_nodes,
    leave_group,
    process_count,
    read_job,
)
from nextdetail.storage.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from nextdetail.storage.fs import Store

Log = Callable[[str], None]


def scheduled_lr(lr: float, step: int, steps: int, decay: str, min_lr_ratio: float, warmup_steps: int = 0,
                 warmup_start: float = 0.0) -> float:
    """The learning rate of `step` (0-based) of `steps`: linear warm-up from `warmup_start`·lr over `warmup_steps`,
    then `decay` — linear or cosine to `min_lr_ratio`·lr at the last step, or constant."""
    if step < warmup_steps:
        return lr * (warmup_start + (1 - warmup_start) * step / warmup_steps)
    t = (step - warmup_steps) / max(steps - warmup_steps, 1)  # 0 → 1 over the decay
    if decay == "linear":
        return lr * (1 - (1 - min_lr_ratio) * t)
    if decay == "cosine":
        return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))
    return lr


@dataclass(frozen=True)
class Run:
    """What this call of the loop did: the step it resumed from, the steps it ran, their wall time."""

    rank: int
    world: int
    resumed_from: int
    steps_done: int
    seconds: float


class Training(ABC):
    """One training stage's own parts; `settings` is its config section (steps, cadences, device, nproc…)."""

    stage: ClassVar[str]  # "train_tokenizer": in logs, errors and the torchrun temp directory
    section: ClassVar[str]  # its config section ("tokenizer"), named by one-line errors
    lr_setting: ClassVar[str]  # the setting the non-finite guard tells the user to lower
    files: ClassVar[list[str]]  # what `finish` writes (summary.json is the loop's)

    settings: Any  # steps, cadences, device, nproc, nodes, resources…

    @abstractmethod
    def build(self, rank: int, world: int, device: torch.device, log: Log) -> None:
        """Model, optimizer and data of this rank (called once per run of the loop, before resuming)."""

    @abstractmethod
    def batches(self, start: int) -> Iterator[Any]:
        """This rank's batches from global step `start` on (a pure function of the step: resumable)."""

    @abstractmethod
    def step(self, step: int, batch: Any) -> dict[str, float]:
        """One optimisation step; the metrics of it (`loss` at least, the global batch's on several ranks)."""

    @abstractmethod
    def state(self, step: int) -> dict[str, Any]:
        """What resumes this training at `step` bit for bit, beyond the step and the metrics."""

    @abstractmethod
    def load(self, state: dict[str, Any]) -> None:
        """Restore `state` (a checkpoint written by `state`)."""

    def started(self, world: int) -> str | None:
        """A line for the log when a run starts from scratch."""
        return None

    @abstractmethod
    def log_line(self, step: int, metrics: list[dict[str, Any]], run: Run) -> str:
        """The line logged after `step` (rank 0); may add to `metrics[-1]` what is worth keeping."""

    def checkpointing(self, store: Store, step: int, metrics: list[dict[str, Any]]) -> None:
        """Rank 0, just before the checkpoint of `step` is written (held-out loss, best weights…)."""
        return None

    @abstractmethod
    def finish(self, store: Store, metrics: list[dict[str, Any]], run: Run) -> dict[str, Any]:
        """Rank 0 after the last step: write `files`; return the stage's own summary entries."""

    @abstractmethod
    def to_job(self) -> dict[str, Any]:
        """What rebuilds this training in a rank (`from_job`): JSON values, but for credentials (SecretStr in storage
        options), which `torchrun.encode_job` keeps out of the job file."""

    @classmethod
    @abstractmethod
    def from_job(cls, job: dict[str, Any]) -> Training:
        """The training `to_job` describes (its secrets SecretStr again)."""


# stage → (module, class) of its Training: the only code a job file can name is one of these
TRAININGS: dict[str, tuple[str, str]] = {
    "train_tokenizer": ("nextdetail.stages.train_tokenizer.tasks", "TokenizerTraining"),
    "train_ar": ("nextdetail.stages.train_ar.tasks", "ARTraining"),
}
JOB_FORMAT = 1


def training_job(store: Store, training: Training) -> dict[str, Any]:
    """The torchrun job of `training` in `store` (`training_of_job` reads it back)."""
    return {"format": JOB_FORMAT, "stage": training.stage, "store": {"url": store.url(), "options": store.options},
            "training": training.to_job()}


def training_of_job(job: dict[str, Any]) -> tuple[Store, Training]:
    """(store, training) of a job: the class by the stage's name in `TRAININGS` (imported from its fixed module),
    never by a name the job gives."""
    if job.get("format") != JOB_FORMAT or job.get("stage") not in TRAININGS:
        raise ValueError(f"not a training job of this nextdetail (format {job.get('format')!r}, stage "
                         f"{job.get('stage')!r})")
    module, name = TRAININGS[job["stage"]]
    training = getattr(importlib.import_module(module), name).from_job(job["training"])
    return Store(job["store"]["url"], job["store"]["options"]), training


def train(store: Store, training: Training, log: Log = print, progress: bool = False,
          stop_after: int | None = None) -> dict[str, Any]:
    """Train (or resume) in `store` in this process — one of `WORLD_SIZE` under torchrun. Returns rank 0's
    summary ({} on other ranks); `{"stopped_at": step}` when `stop_after` steps of this call ended it."""
    s = training.settings
    rank, world, device = join(s.device, training.section)
    threads = torch.get_num_threads()
    if s.torch_threads or world > 1:  # the ranks on one machine (torchrun's local world) share its cores
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(s.torch_threads or max(1, (os.cpu_count() or 1) // local_world))
    try:
        return _loop(store, training, rank, world, device, log if rank == 0 else _quiet, progress, stop_after)
    finally:
        torch.set_num_threads(threads)


def _loop(store: Store, training: Training, rank: int, world: int, device: torch.device, log: Log,
          progress: bool, stop_after: int | None) -> dict[str, Any]:
    from tqdm import tqdm

    s, name = training.settings, training.stage
    training.build(rank, world, device, log)
    metrics: list[dict[str, Any]] = []
    start = 0
    latest = latest_checkpoint(store)
    if latest is not None:
        state = load_checkpoint(store, latest)
        training.load(state)
        start, metrics = int(state["step"]), state["metrics"]
        log(f"{name}: resuming at step {start} from {store.url(latest)}")
    elif (line := training.started(world)) is not None:
        log(line)
    t0, done = time.time(), 0
    bar = tqdm(total=s.steps, initial=start, desc=name, unit="step", disable=not progress or rank > 0, leave=False)
    stream = training.batches(start)
    for step in range(start, s.steps):
        out = training.step(step, next(stream))
        if not math.isfinite(out["loss"]):
            raise UserError(f"{name}: loss became {out['loss']} at step {step}; lower {training.lr_setting}")
        metrics.append({"step": step + 1, **out})
        bar.update()
        done += 1
        last = step + 1 == s.steps
        if rank == 0 and ((step + 1) % s.log_every == 0 or last):
            log(training.log_line(step + 1, metrics, Run(rank, world, start, done, time.time() - t0)))
        if (step + 1) % s.checkpoint_every == 0 or last:
            if rank == 0:
                training.checkpointing(store, step + 1, metrics)
                save_checkpoint(store, step + 1, {"step": step + 1, "metrics": metrics, **training.state(step + 1)},
                                keep=s.keep_checkpoints)
            if world > 1:
                torch.distributed.barrier()  # no rank runs ahead of a checkpoint it might resume from
        if stop_after is not None and done >= stop_after:
            bar.close()
            return {"stopped_at": step + 1}
    bar.close()
    run = Run(rank, world, start, done, time.time() - t0)
    nodes = gather_nodes(world)  # where the ranks ran: every rank takes part
    if rank > 0:
        return {}
    summary = {"steps": s.steps, "resumed_from": start, "processes": world, "nodes": nodes,
               "seconds_this_run": round(run.seconds, 2), **training.finish(store, metrics, run), "url": store.url()}
    store.write_bytes("summary.json", json.dumps(summary, indent=1).encode())
    return summary


def _quiet(_: str) -> None:
    pass


def run_training(store: Store, training: Training, progress: bool, run_id: str) -> tuple[dict[str, Any], list[str]]:
    """The body of a training stage's Prefect task: the loop in this process, or `nproc` ranks under torchrun here,
    or `nodes` × `nproc` ranks on several hosts' Dask workers (this task's worker the first); supervised here: a
    failed group raises ChildProcessError, which Prefect retries from the last checkpoint. `run_id`: names the
    multi-node rendezvous (the artifact's identity)."""
    import uuid

    from prefect import get_run_logger

    logger = get_run_logger()
    s = training.settings
    nproc = process_count(s.nproc, s.device)
    nodes = s.nodes
    if nodes > 1:
        attempt = f"{run_id[:16]}-{uuid.uuid4().hex[:8]}"  # a retry never meets an earlier attempt's agents
        launch_nodes(training.stage, __name__, training_job(store, training), nodes, nproc,
                     dict(s.resources or {}), attempt, logger.info)
        summary = json.loads(store.read_bytes("summary.json"))
    elif nproc > 1:
        launch(training.stage, __name__, training_job(store, training), nproc, logger.info)
        summary = json.loads(store.read_bytes("summary.json"))
    else:
        summary = train(store, training, log=logger.info, progress=progress)
    return summary, [*training.files, "summary.json"]


def _torchrun_main(job_path: str) -> None:
    """One rank under torchrun (`torchrun.launch`, `torchrun.launch_nodes`)."""
    die_with_parent()  # a rank whose agent is killed (its Dask worker with it) must not train on alone
    store, training = training_of_job(read_job(job_path))
    try:
        train(store, training, log=lambda line: print(line, flush=True))
    finally:
        leave_group()


if __name__ == "__main__":
    _torchrun_main(sys.argv[1])
