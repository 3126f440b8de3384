"""The `train_tokenizer` stage: shard tars + base factors → a trained base-detail VQ-VAE.

Data flow (the stage's parts in this file; the loop in `tasks/training.py`; the model in
`models/tokenizer.py`, `quant.py`, `vae.py`; the batches in `storage/factor_loader.py`):
  index.parquet of the decomposition (key → tar, row) ─▶ `FactorBatches`: batch s of the run is a
    pure function of (seed, s): epoch e = s // steps_per_epoch shuffles the tars and each tar's rows
    with a generator seeded (seed, e); images are decoded from the tar, B_1 … B_n read from Zarr
  ─▶ `TokenizerTraining.step`: [with `truncation` > 0 (NDP), that fraction of the batch decodes a random
    quadtree state of the dyadic token pyramid: region-wise random truncation of the finer tokens]
    rec (L2 | L1) + VQ (codebook + β·commitment) [+ λ_p LPIPS] [+ λ_G hinge PatchGAN after
    `gan_start`], AdamW, gradient clipping, bf16 autocast on CUDA; every `restart_dead_every` steps
    dead codes restart from recent encoder outputs; per-map usage/perplexity logged
  ─▶ checkpoints/step-XXXXXXXX.pt every `checkpoint_every` steps (atomic; model, optimizers, RNG,
    quantizer statistics, data position): a killed run resumes at its last checkpoint, bit for bit
  ─▶ tokenizer.pt (spec + weights), metrics.json, curves.png, reconstructions.png, _COMPLETE.json

Identity: the stage's (pipeline/declaration.py): `tokenizer.*` but device/threads/logging, the shard and
decomposition identities, and the code its flow imports. Changing any tokenizer setting re-trains;
changing nothing does nothing.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import fields
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from nextdetail.conf.model_settings import TokenizerConfig
from nextdetail.pipeline import training
from nextdetail.pipeline.tasks import Artifact, stage_task
from nextdetail.pipeline.torchrun import average_gradients
from nextdetail.pipeline.training import Run, Training
from nextdetail.storage.factor_loader import FactorBatches, TrainData
from nextdetail.storage.fs import Store
from nextdetail.storage.hashing import bytes_sha256

if TYPE_CHECKING:
    from nextdetail.pipeline.declaration import StageKey

FILES = ["tokenizer.pt", "metrics.json", "curves.png", "reconstructions.png"]


# ---- training: the stage's parts of the one loop (tasks/training.py) ----------------------------


def tile_2x2(x_BChw: torch.Tensor) -> torch.Tensor:
    """Consecutive fours of a batch tiled 2×2 (x[4i] top left, x[4i+1] top right, x[4i+2] bottom left, then
    bottom right) → (B/4, C, 2h, 2w); B a multiple of 4. Latents and images tile alike (the decoder is
    translation-equivariant up to its borders), so a decoder trained on tiled latents sees maps twice the side."""
    B, C, h, w = x_BChw.shape
    return x_BChw.view(B // 4, 2, 2, C, h, w).permute(0, 3, 1, 4, 2, 5).reshape(B // 4, C, 2 * h, 2 * w)


class TokenizerTraining(Training):
    """Model, losses and optimizers of one run; `state()` / `load()` are the checkpoint."""

    stage, section, lr_setting, files = "train_tokenizer", "tokenizer", "tokenizer.lr", FILES

    def __init__(self, data: TrainData, cfg: TokenizerConfig, spec: Any) -> None:
        self.data, self.settings, self.spec = data, cfg, spec

    def to_job(self) -> dict[str, Any]:
        return {"data": {f.name: getattr(self.data, f.name) for f in fields(TrainData)},
                "settings": self.settings.model_dump(mode="json"), "spec": self.spec.to_dict()}

    @classmethod
    def from_job(cls, job: dict[str, Any]) -> TokenizerTraining:
        from nextdetail.models.configs import TokenizerSpec

        data = TrainData(**{**job["data"], "tars": tuple((tar, int(n)) for tar, n in job["data"]["tars"])})
        spec = TokenizerSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in job["spec"].items()})
        return cls(data, TokenizerConfig.model_validate(job["settings"]), spec)

    def build(self, rank: int, world: int, device: torch.device, log: Callable[[str], None]) -> None:
        from nextdetail.models.tokenizer import BaseDetailVQVAE, load_var_state_dict

        c = self.cfg = self.settings
        self.rank, self.world, self.device = rank, world, device  # world: data-parallel ranks (torchrun)
        self.loader = FactorBatches(self.data, self.spec.order, c.batch_size, c.seed, rank, world)
        torch.manual_seed(c.seed)
        self.model = BaseDetailVQVAE(self.spec)
        if c.init_from:
            load_var_state_dict(self.model, c.init_from)
        self.model.to(self.device).train()
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

    def batches(self, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        return iter(self.loader.iterate(start, self.cfg.steps, self.cfg.loader_workers))

    def started(self, world: int) -> str | None:
        return f"train_tokenizer: {world} data-parallel processes, {self.cfg.batch_size // world} images each per step" \
            if world > 1 else None

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

    def step(self, step: int, batch: tuple[torch.Tensor, torch.Tensor | None]) -> dict[str, float]:
        c = self.cfg
        images, bases = batch
        images = images.to(self.device)
        bases = None if bases is None else bases.to(self.device)
        gan_on = self.disc is not None and step >= c.gan_start
        lr = training.scheduled_lr(c.lr, step, c.steps, c.decay, c.min_lr_ratio)
        for opt in (self.opt, self.opt_d):
            for group in opt.param_groups if opt is not None else ():
                group["lr"] = lr
        with self.autocast():
            recon, q = self.model(images, bases, self.truncated_state(step, images.shape[0]))
            recon = recon.float()
            rec = F.mse_loss(recon, images) if c.rec_loss == "l2" else F.l1_loss(recon, images)
            loss = rec + q.vq_loss
            out = {"rec": float(rec.detach()), "vq": float(q.vq_loss.detach()), "lr": lr}
            if c.mosaic_weight > 0 and images.shape[0] >= 4:  # the decoder also renders maps twice the side
                mosaic = self.mosaic_loss(q.f_hat, images)
                loss = loss + c.mosaic_weight * mosaic
                out["mosaic"] = float(mosaic.detach())
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
            keys = [k for k in out if k not in ("restarted_codes", "lr")]  # the lr is already global
            mean = torch.tensor([out[k] for k in keys], dtype=torch.float64)
            torch.distributed.all_reduce(mean)
            out.update({k: float(v) / self.world for k, v in zip(keys, mean, strict=True)})
        return out

    def mosaic_loss(self, f_hat_BChw: torch.Tensor, images_B3HW: torch.Tensor) -> torch.Tensor:
        """The reconstruction loss of the batch's quantized latents tiled 2×2 (`tile_2x2`, the first multiple of
        4 images) against the same images tiled: the sampler's ×f latents are larger than any map the decoder
        trains on, and at 2× its border rows strayed 21–34 of 255 from the interior's colour (issue 42)."""
        n = images_B3HW.shape[0] // 4 * 4
        recon = self.model.decoder(self.model.post_quant_conv(tile_2x2(f_hat_BChw[:n]))).float()
        target = tile_2x2(images_B3HW[:n])
        return F.mse_loss(recon, target) if self.cfg.rec_loss == "l2" else F.l1_loss(recon, target)

    def state(self, step: int) -> dict[str, Any]:
        return {
            "data_position": self.loader.position(step),
            "model": self.model.state_dict(), "opt": self.opt.state_dict(),
            "disc": self.disc.state_dict() if self.disc else None, "opt_d": self.opt_d.state_dict() if self.opt_d else None,
            "quant_record_hit": self.model.quantize.record_hit,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
            "scaler": None,  # bf16 autocast needs no loss scaling
        }

    def load(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        if self.disc is not None and state["disc"] is not None:
            self.disc.load_state_dict(state["disc"])
            self.opt_d.load_state_dict(state["opt_d"])
        self.model.quantize.record_hit = state["quant_record_hit"]
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(state["rng_cuda"])

    def log_line(self, step: int, metrics: list[dict[str, Any]], run: Run) -> str:
        out, health = metrics[-1], self.model.quantize.usage()
        out["usage"] = [h["usage"] for h in health]
        out["perplexity"] = [h["perplexity"] for h in health]
        return (f"train_tokenizer: step {step}/{self.cfg.steps} loss {out['loss']:.4f} rec {out['rec']:.4f} "
                f"vq {out['vq']:.4f} | code usage per map " + " ".join(f"{h['usage']:.2f}" for h in health)
                + " | perplexity " + " ".join(f"{h['perplexity']:.0f}" for h in health))

    def finish(self, store: Store, metrics: list[dict[str, Any]], run: Run) -> dict[str, Any]:
        """tokenizer.pt (spec + weights), metrics.json, the curves and a reconstruction grid."""
        cfg, spec = self.cfg, self.spec
        model = self.model.eval()
        buf = io.BytesIO()
        torch.save({"spec": spec.to_dict(), "model": model.state_dict()}, buf)
        store.write_bytes("tokenizer.pt", buf.getvalue())
        store.write_bytes("metrics.json", json.dumps(metrics).encode())
        from nextdetail.figures import png_bytes, reconstruction_grid, training_curves

        store.write_bytes("curves.png", png_bytes(training_curves(metrics)))
        images, bases = FactorBatches(self.data, spec.order, cfg.batch_size, cfg.seed).batch(0)
        with torch.no_grad():
            n = min(8, len(images))
            idx = model.img_to_indices(images[:n].to(self.device),
                                       None if bases is None else bases[:, :n].to(self.device))
            recon = model.indices_to_img(idx).float().cpu()
        store.write_bytes("reconstructions.png", png_bytes(reconstruction_grid(images[:n], recon)))
        last = metrics[-1] if metrics else {}
        health = model.quantize.usage()
        return {
            "steps_per_s": round(run.steps_done / max(run.seconds, 1e-9), 3), "token_maps": len(model.schedule),
            "final_loss": last.get("loss"), "final_rec": last.get("rec"),
            "rec_psnr_db": round(10 * math.log10(4 / max(last.get("rec", 1.0), 1e-12)), 2)
            if cfg.rec_loss == "l2" else None,
            "code_usage_per_map": [round(h["usage"], 3) for h in health],
            "perplexity_per_map": [round(h["perplexity"], 1) for h in health],
            "tokenizer_sha256": bytes_sha256(buf.getvalue()),  # the token cache's identity names these weights
        }


def train(store: Store, data: TrainData, cfg: TokenizerConfig, spec: Any, log: Callable[[str], None] = print,
          progress: bool = False, stop_after: int | None = None) -> dict[str, Any]:
    """Train (or resume) in `store` in this process (the loop of `tasks/training.py`); rank 0's summary."""
    return training.train(store, TokenizerTraining(data, cfg, spec), log, progress, stop_after)


@stage_task(name="train_tokenizer", retries=1)
def train_tokenizer(artifact: Artifact, data: TrainData, cfg: TokenizerConfig, spec: Any,
                    progress: bool = False) -> tuple[dict, list[str]]:
    return training.run_training(artifact.store, TokenizerTraining(data, cfg, spec), progress, run_id=artifact.identity)


@stage_task(name="adopt_tokenizer", retries=1)
def adopt_tokenizer(artifact: Artifact, source: str, options: dict, spec: Any) -> tuple[dict, list[str]]:
    """`tokenizer.pretrained`: a released tokenizer as this stage's artifact instead of a training run — written
    as a nextdetail tokenizer.pt (spec + weights) so that tokenize, sample and evaluate read it as any other."""
    from nextdetail.models.tokenizer import load_pretrained

    model, layout = load_pretrained(source, options, spec)
    buf = io.BytesIO()
    torch.save({"spec": spec.to_dict(), "model": model.state_dict()}, buf)
    artifact.store.write_bytes("tokenizer.pt", buf.getvalue())
    summary = {"adopted_from": source, "layout": layout, "steps": 0, "token_maps": len(model.schedule),
               "url": artifact.store.url(), "tokenizer_sha256": bytes_sha256(buf.getvalue())}
    artifact.store.write_bytes("summary.json", json.dumps(summary, indent=1).encode())
    return summary, ["tokenizer.pt", "summary.json"]


def plan_training(root: Store, key: StageKey, spec: Any) -> Artifact:
    """The tokenizer artifact in its own directory under `root`, named by the stage identity: checkpoints there
    belong to exactly this training (another decomposition or setting never resumes them)."""
    name = f"v{spec.vocab_size}-order{spec.order}-maps{spec.n_maps}"
    return Artifact("train_tokenizer", key.identity, root.sub(f"{name}-{key.identity[:12]}"), "_COMPLETE.json",
                    lineage=key.lineage())

