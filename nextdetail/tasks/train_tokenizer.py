"""The `train_tokenizer` stage: shard tars + base factors → a trained base-detail VQ-VAE.

Data flow (all of it in this file; the model in `models/tokenizer.py`, `quant.py`, `vae.py`):
  index.parquet of the decomposition (key → tar, row) ─▶ `FactorBatches`: batch s of the run is a
    pure function of (seed, s): epoch e = s // steps_per_epoch shuffles the tars and each tar's rows
    with a generator seeded (seed, e); images are decoded from the tar, B_1 … B_n read from Zarr
  ─▶ `train()`: [with `truncation` > 0 (NDP), that fraction of the batch decodes a random quadtree
    state of the dyadic token pyramid: region-wise random truncation of the finer tokens] rec (L2 | L1) + VQ (codebook + β·commitment) [+ λ_p LPIPS] [+ λ_G hinge PatchGAN after
    `gan_start`], AdamW, gradient clipping, bf16 autocast on CUDA; every `restart_dead_every` steps
    dead codes restart from recent encoder outputs; per-map usage/perplexity logged
  ─▶ checkpoints/step-XXXXXXXX.pt every `checkpoint_every` steps (atomic; model, optimizers, RNG,
    quantizer statistics, data position): a killed run resumes at its last checkpoint, bit for bit
  ─▶ tokenizer.pt (spec + weights), metrics.json, curves.png, reconstructions.png, _COMPLETE.json

Identity: the stage's (conf/stages.py): `tokenizer.*` but device/threads/logging, the shard and
decomposition identities, and the code its flow imports. Changing any tokenizer setting re-trains;
changing nothing does nothing.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from nextdetail.conf.schema import TokenizerConfig
from nextdetail.errors import UserError
from nextdetail.storage.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from nextdetail.storage.factor_loader import FactorBatches, TrainData
from nextdetail.storage.fs import Store
from nextdetail.storage.hashing import bytes_sha256
from nextdetail.tasks.stage import Artifact, stage_task
from nextdetail.tasks.torchrun import (
    average_gradients,
    join,
    launch,
    leave_group,
    process_count,
    read_job,
)

if TYPE_CHECKING:
    from nextdetail.conf.stages import StageKey

FILES = ["tokenizer.pt", "metrics.json", "curves.png", "reconstructions.png", "summary.json"]


# ---- training ---------------------------------------------------------------------------------


@dataclass
class Trainer:
    """Model, losses and optimizers of one run; `state()` / `load()` are the checkpoint."""

    cfg: TokenizerConfig
    spec: Any
    device: torch.device
    rank: int = 0
    world: int = 1  # data-parallel ranks (torchrun): gradients, code statistics and restarts kept in sync

    def __post_init__(self) -> None:
        from nextdetail.models.tokenizer import BaseDetailVQVAE, load_var_state_dict

        torch.manual_seed(self.cfg.seed)
        self.model = BaseDetailVQVAE(self.spec)
        if self.cfg.init_from:
            load_var_state_dict(self.model, self.cfg.init_from)
        self.model.to(self.device).train()
        c = self.cfg
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=c.lr, betas=c.betas, weight_decay=c.weight_decay)
        self.lpips = None
        if c.lpips_weight > 0:
            from nextdetail.models.lpips import LPIPS

            self.lpips = LPIPS(c.lpips_vgg16, c.lpips_lin).to(self.device)
        self.disc = self.opt_d = None
        if c.gan_weight > 0:
            from nextdetail.models.discriminator import PatchDiscriminator

            self.disc = PatchDiscriminator().to(self.device).train()
            self.opt_d = torch.optim.AdamW(self.disc.parameters(), lr=c.lr, betas=c.betas, weight_decay=c.weight_decay)
        if self.world > 1:  # every rank starts from rank 0's weights (init_from, seeding: make sure)
            for module in (self.model, self.disc):
                for t in [*module.parameters(), *module.buffers()] if module is not None else ():
                    torch.distributed.broadcast(t.data, 0)

    def autocast(self) -> Any:
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def truncated_state(self, step: int, batch: int) -> list[torch.Tensor] | None:
        """NDP's mixed-scale training: which tokens each image decodes from. A `truncation` fraction of
        the images gets a random quadtree state (each node refined with the image's p ~ U(0, 1)), the
        rest every token. Drawn for the whole global batch from a generator seeded by (seed, step), this
        rank taking its slice: resumable without RNG state, the same draws on any number of processes."""
        if self.cfg.truncation <= 0:
            return None
        from nextdetail.models.quadtree import Quadtree

        g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.cfg.seed, step]).generate_state(1)[0]))
        total = batch * self.world
        sides = tuple(m.side for m in self.model.schedule)
        p = torch.rand(total, generator=g)
        p = torch.where(torch.rand(total, generator=g) < self.cfg.truncation, p, torch.ones(total))  # 1: full pyramid
        mine = slice(self.rank * batch, (self.rank + 1) * batch)
        return [m[mine].to(self.device) for m in Quadtree.random(p, sides, g).present()]

    def step(self, step: int, images: torch.Tensor, bases: torch.Tensor | None) -> dict[str, float]:
        c = self.cfg
        images = images.to(self.device)
        bases = None if bases is None else bases.to(self.device)
        gan_on = self.disc is not None and step >= c.gan_start
        with self.autocast():
            recon, q = self.model(images, bases, self.truncated_state(step, images.shape[0]))
            recon = recon.float()
            rec = F.mse_loss(recon, images) if c.rec_loss == "l2" else F.l1_loss(recon, images)
            loss = rec + q.vq_loss
            out = {"rec": float(rec.detach()), "vq": float(q.vq_loss.detach())}
            if self.lpips is not None:
                perceptual = self.lpips(recon, images).mean()
                loss = loss + c.lpips_weight * perceptual
                out["lpips"] = float(perceptual.detach())
            if gan_on:
                from nextdetail.models.discriminator import hinge_g_loss

                g = hinge_g_loss(self.disc(recon))
                loss = loss + c.gan_weight * g
                out["gan_g"] = float(g.detach())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(list(self.model.parameters()), self.world)
        out["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip))
        self.opt.step()
        if gan_on:
            from nextdetail.models.discriminator import hinge_d_loss

            with self.autocast():
                d = hinge_d_loss(self.disc(images), self.disc(recon.detach()))
            self.opt_d.zero_grad(set_to_none=True)
            d.backward()
            average_gradients(list(self.disc.parameters()), self.world)
            self.opt_d.step()
            if self.world > 1:  # BatchNorm normalizes each rank's half (as DDP without SyncBatchNorm); its
                for buf in self.disc.buffers():  # running statistics follow rank 0's, as DDP broadcasts them
                    torch.distributed.broadcast(buf, 0)
            out["gan_d"] = float(d.detach())
        quantize = self.model.quantize
        if self.world > 1:  # code statistics of the global batch (the EMA is linear: mean of the ranks' EMAs)
            torch.distributed.all_reduce(quantize.ema_vocab_hit_SV)
            quantize.ema_vocab_hit_SV.div_(self.world)
        if c.restart_dead_every and (step + 1) % c.restart_dead_every == 0:
            g = torch.Generator().manual_seed(c.seed * 1_000_003 + step)  # a function of the step: resumable
            out["restarted_codes"] = quantize.restart_dead_codes(c.dead_threshold, g)
            if self.world > 1:  # each rank drew from its own recent residuals: rank 0's restarted codes win
                torch.distributed.broadcast(quantize.embedding.weight.data, 0)
        out["loss"] = float(loss.detach())
        if self.world > 1:  # the logged numbers are the global batch's
            keys = [k for k in out if k != "restarted_codes"]
            mean = torch.tensor([out[k] for k in keys], dtype=torch.float64)
            torch.distributed.all_reduce(mean)
            out.update({k: float(v) / self.world for k, v in zip(keys, mean, strict=True)})
        return out

    def state(self, step: int, position: dict[str, int], metrics: list[dict]) -> dict[str, Any]:
        return {
            "step": step, "data_position": position, "metrics": metrics,
            "model": self.model.state_dict(), "opt": self.opt.state_dict(),
            "disc": self.disc.state_dict() if self.disc else None, "opt_d": self.opt_d.state_dict() if self.opt_d else None,
            "quant_record_hit": self.model.quantize.record_hit,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
            "scaler": None,  # bf16 autocast needs no loss scaling
        }

    def load(self, state: dict[str, Any]) -> int:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        if self.disc is not None and state["disc"] is not None:
            self.disc.load_state_dict(state["disc"])
            self.opt_d.load_state_dict(state["opt_d"])
        self.model.quantize.record_hit = state["quant_record_hit"]
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        return int(state["step"])


def train(
    store: Store, data: TrainData, cfg: TokenizerConfig, spec: Any, log: Callable[[str], None] = print,
    progress: bool = False, stop_after: int | None = None,
) -> dict[str, Any]:
    """Train (or resume) in `store` in this process — one of `WORLD_SIZE` under torchrun; returns rank 0's
    summary. `stop_after`: leave after that many steps of this call (tests: an interrupted run)."""
    rank, world, device = join(cfg.device, "tokenizer")
    threads = torch.get_num_threads()
    if cfg.torch_threads or world > 1:
        torch.set_num_threads(cfg.torch_threads or max(1, (os.cpu_count() or 1) // world))
    try:
        return _train(store, data, cfg, spec, device, rank, world, log, progress, stop_after)
    finally:
        torch.set_num_threads(threads)


def _train(store: Store, data: TrainData, cfg: TokenizerConfig, spec: Any, device: torch.device, rank: int,
           world: int, log: Callable[[str], None], progress: bool, stop_after: int | None) -> dict[str, Any]:
    from tqdm import tqdm

    batches = FactorBatches(data, spec.order, cfg.batch_size, cfg.seed, rank, world)
    trainer = Trainer(cfg, spec, device, rank, world)
    metrics: list[dict] = []
    start = 0
    latest = latest_checkpoint(store)
    if latest is not None:
        state = load_checkpoint(store, latest)
        start, metrics = trainer.load(state), state["metrics"]
        if rank == 0:
            log(f"train_tokenizer: resuming at step {start} from {store.url(latest)}")
    elif rank == 0 and world > 1:
        log(f"train_tokenizer: {world} data-parallel processes, {cfg.batch_size // world} images each per step")
    t0, done = time.time(), 0
    bar = tqdm(total=cfg.steps, initial=start, desc="train_tokenizer", unit="step", disable=not progress or rank > 0,
               leave=False)
    stream = batches.iterate(start, cfg.steps, cfg.loader_workers)
    for step in range(start, cfg.steps):
        images, bases = next(stream)
        out = trainer.step(step, images, bases)
        if not math.isfinite(out["loss"]):
            raise UserError(f"train_tokenizer: loss became {out['loss']} at step {step}; lower tokenizer.lr")
        metrics.append({"step": step + 1, **out})
        bar.update()
        done += 1
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            health = trainer.model.quantize.usage()
            (log if rank == 0 else _quiet)(f"train_tokenizer: step {step + 1}/{cfg.steps} loss {out['loss']:.4f} rec {out['rec']:.4f} "
                f"vq {out['vq']:.4f} | code usage per map " + " ".join(f"{h['usage']:.2f}" for h in health)
                + " | perplexity " + " ".join(f"{h['perplexity']:.0f}" for h in health))
            metrics[-1]["usage"] = [h["usage"] for h in health]
            metrics[-1]["perplexity"] = [h["perplexity"] for h in health]
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            if rank == 0:
                save_checkpoint(store, step + 1, trainer.state(step + 1, batches.position(step + 1), metrics))
            if world > 1:
                torch.distributed.barrier()  # no rank runs ahead of a checkpoint it might resume from
        if stop_after is not None and done >= stop_after:
            bar.close()
            return {"stopped_at": step + 1}
    bar.close()
    seconds = time.time() - t0
    if rank > 0:
        return {}
    model = trainer.model.eval()
    buf = io.BytesIO()
    torch.save({"spec": spec.to_dict(), "model": model.state_dict()}, buf)
    store.write_bytes("tokenizer.pt", buf.getvalue())
    checkpoint_sha256 = bytes_sha256(buf.getvalue())  # the token cache's identity names these exact weights
    store.write_bytes("metrics.json", json.dumps(metrics).encode())
    from nextdetail.figures import png_bytes, reconstruction_grid, training_curves

    store.write_bytes("curves.png", png_bytes(training_curves(metrics)))
    images, bases = FactorBatches(data, spec.order, cfg.batch_size, cfg.seed).batch(0)
    with torch.no_grad():
        n = min(8, len(images))
        idx = model.img_to_indices(images[:n].to(device), None if bases is None else bases[:, :n].to(device))
        recon = model.indices_to_img(idx).float().cpu()
    store.write_bytes("reconstructions.png", png_bytes(reconstruction_grid(images[:n], recon)))
    last = metrics[-1] if metrics else {}
    health = model.quantize.usage()
    summary = {
        "steps": cfg.steps, "resumed_from": start, "processes": world, "seconds_this_run": round(seconds, 2),
        "steps_per_s": round(done / max(seconds, 1e-9), 3), "token_maps": len(model.schedule),
        "final_loss": last.get("loss"), "final_rec": last.get("rec"),
        "rec_psnr_db": round(10 * math.log10(4 / max(last.get("rec", 1.0), 1e-12)), 2) if cfg.rec_loss == "l2" else None,
        "code_usage_per_map": [round(h["usage"], 3) for h in health],
        "perplexity_per_map": [round(h["perplexity"], 1) for h in health],
        "url": store.url(),
        "tokenizer_sha256": checkpoint_sha256,
    }
    store.write_bytes("summary.json", json.dumps(summary, indent=1).encode())
    return summary


def _quiet(_: str) -> None:
    pass


@stage_task(name="train_tokenizer", retries=1)
def train_tokenizer(artifact: Artifact, data: TrainData, cfg: TokenizerConfig, spec: Any,
                    progress: bool = False) -> tuple[dict, list[str]]:
    from prefect import get_run_logger

    logger = get_run_logger()
    nproc = process_count(cfg.nproc, cfg.device)
    if nproc > 1:
        job = {"store": (artifact.store.url(), artifact.store.options), "data": data, "cfg": cfg.model_dump(),
               "spec": spec}
        launch("train_tokenizer", "nextdetail.tasks.train_tokenizer", job, nproc, logger.info)
        summary = json.loads(artifact.store.read_bytes("summary.json"))
    else:
        summary = train(artifact.store, data, cfg, spec, log=logger.info, progress=progress)
    return summary, FILES


def _torchrun_main(job_path: str) -> None:
    """One rank under torchrun (`launch`)."""
    job = read_job(job_path)
    try:
        train(Store(*job["store"]), job["data"], TokenizerConfig(**job["cfg"]), job["spec"],
              log=lambda s: print(s, flush=True))
    finally:
        leave_group()


def plan_training(root: Store, key: StageKey, spec: Any) -> Artifact:
    """The tokenizer artifact in its own directory under `root`, named by the stage identity: checkpoints there
    belong to exactly this training (another decomposition or setting never resumes them)."""
    name = f"v{spec.vocab_size}-order{spec.order}-maps{len(spec.patch_nums) + spec.order * spec.detail_depth}"
    return Artifact("train_tokenizer", key.identity, root.sub(f"{name}-{key.identity[:12]}"), "_COMPLETE.json",
                    lineage=key.lineage())


if __name__ == "__main__":
    _torchrun_main(sys.argv[1])
