"""The `train_ar` stage: the token cache → a trained next-detail transformer (CART §3.3, Eq. 13).

Data flow (all of it in this file; the model in `models/transformer.py`):
  token cache of `tokenize` ─▶ `TokenBatches`: rank r of W serves disjoint chunks; batch b of epoch e is
    a pure function of (seed, e, r, W, b), so step s's batch needs no replay on resume
  ─▶ `TeacherInputs`: the M token maps ─▶ the inputs of maps 2…M, f̂_{k−1} area-resampled to map k
    (VAR's teacher forcing), by the quantizer of exactly the tokenizer.pt the cache was encoded with
  ─▶ `ARTrainer.step`: cross-entropy over all L tokens, class dropout (CFG), AdamW (β 0.9/0.95, no decay
    on gains/biases/positions), lr = base_lr · batch/base_batch with warm-up and decay, gradient
    clipping, bf16 autocast on CUDA; step s's randomness is seeded by (seed, rank, s), so a resumed run
    repeats an uninterrupted one without carrying RNG state
  ─▶ checkpoints/step-N.pt (atomic: model, optimizer, metrics, data position) every `checkpoint_every`;
    best.pt = the lowest held-out loss so far; at the end transformer.pt, metrics.csv, loss.png,
    summary.json, _COMPLETE.json

Processes: one, in the flow's process, or `nproc` data-parallel ones under torchrun (`launch`), which
the Prefect task supervises: a crashed process group is an infrastructure failure, retried by Prefect
from the last checkpoint.

Identity: the stage's (conf/stages.py): `ar.*` but runtime knobs, the shard, tokenizer (+ its weights' sha256)
and token-cache identities, and the code its flow imports (the model family's included).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from nextdetail.conf.schema import ARConfig
from nextdetail.errors import UserError
from nextdetail.models import family
from nextdetail.storage.checkpoints import (
    latest_checkpoint,
    load_checkpoint,
    read_torch,
    save_checkpoint,
    tensors_sha256,
    write_torch,
)
from nextdetail.storage.fs import Store
from nextdetail.storage.hashing import bytes_sha256
from nextdetail.tasks.stage import Artifact, stage_task
from nextdetail.tasks.torchrun import join, launch, leave_group, process_count, read_job

if TYPE_CHECKING:
    from nextdetail.conf.stages import StageKey

EXPORT_FORMAT = 1
FILES = ["transformer.pt", "best.pt", "metrics.csv", "loss.png", "summary.json"]


@dataclass(frozen=True)
class ARData:
    """What the stage reads: a published token cache and the tokenizer its tokens came from."""

    tokens_url: str
    tokens_options: dict | None
    local_cache: str | None
    tokens_identity: str
    tokenizer_url: str  # …/tokenizer.pt
    tokenizer_sha256: str
    options: dict  # storage options (the tokenizer's store)
    classes: tuple[str, ...]

    def open_cache(self) -> Any:
        from nextdetail.storage.tokens import TokenCache

        return TokenCache(self.tokens_url, self.tokens_options, self.local_cache)

    def tokenizer(self, device: str | torch.device = "cpu") -> Any:
        from nextdetail.models.tokenizer import load_tokenizer

        return load_tokenizer(self.tokenizer_url, self.options, self.tokenizer_sha256,
                              f"the token cache {self.tokens_url}").to(device)


ModelConfig = Any  # the `Config` of a model family: TransformerConfig (cart) or NDPConfig (ndp)


def transformer_config(cfg: ARConfig, layout: dict[str, Any], num_classes: int, cvae: int) -> ModelConfig:
    """The architecture: map sides and vocabulary from the token cache's layout, the rest from `ar.*`;
    `ar.model=ndp` needs the maps to be a dyadic pyramid (1, 2, 4, …, latent side)."""
    from nextdetail.models.quadtree import is_dyadic

    sides = tuple(int(m["height"]) for m in layout["maps"])
    common = dict(vocab_size=int(layout["vocab_size"]), cvae=cvae, num_classes=num_classes, depth=cfg.depth,
                  width=cfg.width, heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, drop_path=cfg.drop_path,
                  cond_drop=cfg.class_dropout, attn_l2_norm=cfg.attn_l2_norm)
    if cfg.model == "cart":
        n_base = sum(1 for m in layout["maps"] if m.get("kind", "base") == "base")
        return family("cart", "model").Config(sides=sides, n_base=n_base if n_base < len(sides) else None, **common)
    if not is_dyadic(sides):
        raise UserError(f"ar.model=ndp needs a dyadic token pyramid, but this token cache has maps {sides}; train the "
                        "tokenizer with tokenizer.order=0 and patch_nums 1, 2, 4, … (`--model ndp` sets them)")
    return family("ndp", "model").Config(latent_side=sides[-1], **common)


def model_kind(mcfg: ModelConfig) -> str:
    return mcfg.kind


def split_maps(tokens_BL: torch.Tensor, sides: tuple[int, ...]) -> list[torch.Tensor]:
    """(B, L) → the M token maps (B, s_k, s_k), in prediction order."""
    return [t.view(-1, s, s) for t, s in zip(tokens_BL.split([s * s for s in sides], dim=1), sides, strict=True)]


class TeacherInputs:
    """Tokens (B, L) → the transformer's inputs for maps 2…M (B, L − first_l, Cvae) (`quant.next_inputs`)."""

    def __init__(self, tokenizer: Any, sides: tuple[int, ...]) -> None:
        self.quantizer = tokenizer.quantize.eval().requires_grad_(False)
        self.latent_side, self.sides = tokenizer.spec.latent_side, sides

    def __call__(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        return self.quantizer.next_inputs(split_maps(tokens_BL, self.sides), self.latent_side)

    @torch.no_grad()
    def detail_target(self, tokens_BL: torch.Tensor, n_base: int) -> torch.Tensor:
        """CART's detail-dial target (B, l_b): log of the detail maps' summed contribution ‖Σ_{k ≥ n_base}
        φ_k(z_k)‖² averaged over each cell of the last base map — where detail matters."""
        maps = split_maps(tokens_BL, self.sides)
        detail = sum(self.quantizer._to_latent(k, maps[k], self.latent_side) for k in range(n_base, len(maps)))
        energy = detail.float().square().sum(1, keepdim=True)  # (B, 1, S, S)
        side = self.sides[n_base - 1]
        return torch.log(F.adaptive_avg_pool2d(energy, side).flatten(1) + 1e-6)  # (B, l_b)


# ---- distributed ------------------------------------------------------------------------------


def step_seed(seed: int, rank: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


# ---- the model and its optimisation -----------------------------------------------------------


NO_DECAY = ("pos_start", "pos_1LC", "lvl_embed", "scale_mul_1H11", "q_bias", "v_bias")


class ARTrainer:
    """Model, optimizer and schedule of one process; `state()` / `load()` are the checkpoint."""

    def __init__(self, cfg: ARConfig, tcfg: ModelConfig, teacher: TeacherInputs, device: torch.device,
                 rank: int = 0, world: int = 1) -> None:
        self.cfg, self.tcfg, self.teacher, self.device, self.rank, self.world = cfg, tcfg, teacher, device, rank, world
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.kind = model_kind(tcfg)
        self.model = family(self.kind, "model").Model(tcfg).to(device)
        self.net: torch.nn.Module = self.model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        # CART's per-token loss weights (L,), summing to 1: uniform (VAR), or each map's tokens share 1/M
        sizes = torch.tensor([s * s for s in tcfg.sides], dtype=torch.float32)
        per_map = 1 / (len(sizes) * sizes) if cfg.loss_weighting == "map" else torch.full_like(sizes, 1 / tcfg.L)
        self.token_weights = per_map.repeat_interleave(sizes.long()).to(device)
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            (no_decay if p.ndim < 2 or any(k in name for k in NO_DECAY) else decay).append(p)
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)

    def lr_at(self, step: int) -> float:
        c = self.cfg
        if step < c.warmup_steps:
            return c.lr * (c.warmup_start + (1 - c.warmup_start) * step / c.warmup_steps)
        t = (step - c.warmup_steps) / max(c.steps - c.warmup_steps, 1)  # 0 → 1 over the decay
        floor = c.min_lr_ratio
        if c.decay == "linear":
            return c.lr * (1 - (1 - floor) * t)
        if c.decay == "cosine":
            return c.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))
        return c.lr

    def autocast(self) -> Any:
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def step(self, step: int, tokens: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        torch.manual_seed(step_seed(self.cfg.seed, self.rank, step))  # class dropout, drop path
        tokens, labels = tokens.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        lr = self.lr_at(step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.model.train()
        loss, acc, extra = self.objective(self.net, tokens, labels, self.cfg.label_smoothing)
        aux = extra.pop("aux_loss", None)  # CART's detail-difficulty head: trained, not part of the reported loss
        self.opt.zero_grad(set_to_none=True)
        (loss if aux is None else loss + aux).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        return {"loss": float(loss.detach()), "acc": float(acc), "lr": lr, "grad_norm": float(grad_norm), **extra}

    def objective(self, net: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor, label_smoothing: float,
                  drop_labels: bool | None = None, generator: torch.Generator | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """(mean loss over the batch, token accuracy, extra metrics). CART: CE of all L tokens given the
        maps before (teacher forcing). NDP: a random quadtree state per image (`models/ndp.ndp_loss`)."""
        if self.kind == "ndp":
            with self.autocast():
                loss, m = family("ndp", "model").ndp_loss(self.model, net, self.teacher.quantizer, tokens, labels, self.cfg.loss_weighting,
                                   self.cfg.difficulty_weight, label_smoothing, generator, drop_labels)
            return loss, m["acc"], {"difficulty_loss": float(m["difficulty_loss"]), "leaves": float(m["leaves"])}
        x = self.teacher(tokens)  # (B, L − first_l, Cvae)
        dial = self.model.detail_head is not None and self.cfg.difficulty_weight > 0
        with self.autocast():
            out = net(labels, x, drop_labels=drop_labels, return_features=dial)
        logits = out[0] if dial else out  # (B, L, V)
        ce = F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none", label_smoothing=label_smoothing)  # (B, L)
        extra: dict[str, Any] = {}
        if dial:  # the dial's head, on detached features: log detail energy under each last-base-map position
            bg, ed = self.model.begin_ends[self.tcfg.n_base - 1]
            pred = self.model.detail_difficulty(out[1][:, bg:ed])  # (B, l_b)
            d_err = F.mse_loss(pred, self.teacher.detail_target(tokens, self.tcfg.n_base))
            extra = {"aux_loss": self.cfg.difficulty_weight * d_err, "difficulty_loss": float(d_err.detach())}
        return ce.mul(self.token_weights).sum(1).mean(), (logits.detach().argmax(-1) == tokens).float().mean(), extra

    @torch.no_grad()
    def evaluate(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        """Held-out loss (the training objective's weighting) and token accuracy with true labels (no
        class dropout, no drop path; NDP's quadtree states from a fixed generator: comparable across steps)."""
        self.model.eval()
        generator = torch.Generator().manual_seed(0)
        total, correct, images = 0.0, 0.0, 0
        for tokens, labels in batches:
            tokens, labels = tokens.to(self.device), labels.to(self.device)
            loss, acc, _ = self.objective(self.model, tokens, labels, 0.0, drop_labels=False, generator=generator)
            total, correct, images = total + float(loss) * len(tokens), correct + float(acc) * len(tokens), images + len(tokens)
        return {"val_loss": total / images, "val_acc": correct / images}

    def state(self, step: int, position: dict[str, int], metrics: list[dict], best: dict) -> dict[str, Any]:
        return {"step": step, "data_position": position, "metrics": metrics, "best": best,
                "model": self.model.state_dict(), "opt": self.opt.state_dict(),
                "scaler": None}  # bf16 autocast needs no loss scaling

    def load(self, state: dict[str, Any]) -> int:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        return int(state["step"])


def export(model: torch.nn.Module, data: ARData, step: int, val_loss: float | None) -> dict[str, Any]:
    """What sampling loads (transformer.pt / best.pt): architecture, weights, and what they belong to."""
    return {"format": EXPORT_FORMAT, "kind": model_kind(model.cfg), "config": asdict(model.cfg),
            "model": model.state_dict(), "step": step,
            "val_loss": val_loss, "classes": list(data.classes), "token_cache": data.tokens_identity,
            "tokenizer": {"url": data.tokenizer_url, "sha256": data.tokenizer_sha256}}


def load_transformer(checkpoint: bytes | str, map_location: str = "cpu",
                     where: str | None = None) -> tuple[torch.nn.Module, dict]:
    """An exported model (eval mode) — `NextDetailTransformer` (kind cart) or `NextDetailMaskedTransformer`
    (kind ndp) — and its record (classes, tokenizer url + sha256, step, …)."""
    where = where or ("transformer checkpoint" if isinstance(checkpoint, bytes) else checkpoint)
    saved = read_torch(checkpoint, where, map_location)
    if saved.get("format") != EXPORT_FORMAT:
        raise UserError(f"{where}: not a transformer.pt/best.pt "
                        "of `nextdetail train-ar` (a step checkpoint? use the run's transformer.pt)")
    c, kind = saved["config"], saved.get("kind", "cart")
    models = family(kind, "model")
    model = models.Model(models.Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in c.items()}))
    model.load_state_dict(saved["model"])
    return model.eval(), saved


# ---- the loop ---------------------------------------------------------------------------------


def _stream(batches: Any, start: int, workers: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches from global step `start` on, epoch after epoch."""
    epoch, b = divmod(start, batches.batches_per_epoch)
    while True:
        yield from batches.epoch(epoch, workers, start=b)
        epoch, b = epoch + 1, 0


def train(store: Store, data: ARData, cfg: ARConfig, log: Callable[[str], None] = print, progress: bool = False,
          stop_after: int | None = None) -> dict[str, Any]:
    """Train (or resume) in `store` in this process — one of `WORLD_SIZE` under torchrun. Returns rank 0's
    summary. `stop_after`: leave after that many steps of this call (tests: an interrupted run)."""
    rank, world, device = join(cfg.device, "ar")
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.torch_threads or max(1, (os.cpu_count() or 1) // world))
    try:
        return _train(store, data, cfg, device, rank, world, log, progress, stop_after)
    finally:
        torch.set_num_threads(threads)


def _train(store: Store, data: ARData, cfg: ARConfig, device: torch.device, rank: int, world: int,
           log: Callable[[str], None], progress: bool, stop_after: int | None) -> dict[str, Any]:
    from tqdm import tqdm

    from nextdetail.storage.token_loader import TokenBatches

    if cfg.batch_size % world:
        raise UserError(f"ar.batch_size={cfg.batch_size} does not split over {world} processes; make it a multiple")
    cache = data.open_cache()
    tokenizer = data.tokenizer(device)
    tcfg = transformer_config(cfg, cache.layout, len(data.classes), tokenizer.spec.z_channels)
    teacher = TeacherInputs(tokenizer, tcfg.sides)
    batches = TokenBatches(cache, cfg.split, cfg.batch_size // world, cfg.seed, rank=rank, world=world)
    held_out = []
    if cfg.val_split is not None and rank == 0:
        val = TokenBatches(cache, cfg.val_split, min(cfg.batch_size, 64), seed=0, rank=0, world=1)
        held_out = [val[(0, b)] for b in range(min(cfg.val_batches, val.batches_per_epoch))]
    trainer = ARTrainer(cfg, tcfg, teacher, device, rank, world)
    params = sum(p.numel() for p in trainer.model.parameters())
    metrics: list[dict] = []
    best: dict[str, Any] = {"val_loss": None, "step": None}
    start = 0
    latest = latest_checkpoint(store)
    if latest is not None:
        state = load_checkpoint(store, latest)
        start, metrics, best = trainer.load(state), state["metrics"], state["best"]
        log(f"train_ar: resuming at step {start} from {store.url(latest)}")
    elif rank == 0:
        log(f"train_ar: {params / 1e6:.2f} M parameters, {len(tcfg.sides)} token maps ({tcfg.L} tokens), "
            f"vocabulary {tcfg.vocab_size} (uniform loss {math.log(tcfg.vocab_size):.3f}), {world} process(es), "
            f"lr {cfg.lr:.2e}")
    tokens_per_step = cfg.batch_size * tcfg.L
    t0, done = time.time(), 0
    bar = tqdm(total=cfg.steps, initial=start, desc="train_ar", unit="step", disable=not progress or rank > 0,
               leave=False)
    stream = _stream(batches, start, cfg.loader_workers)
    for step in range(start, cfg.steps):
        tokens, labels = next(stream)
        out = trainer.step(step, tokens, labels)
        if not math.isfinite(out["loss"]):
            raise UserError(f"train_ar: loss became {out['loss']} at step {step}; lower ar.base_lr")
        metrics.append({"step": step + 1, **out})
        bar.update()
        done += 1
        last = step + 1 == cfg.steps
        if (step + 1) % cfg.log_every == 0 or last:
            recent = metrics[-cfg.log_every:]
            rate = done * tokens_per_step / max(time.time() - t0, 1e-9)
            if rank == 0:
                ndp = (f" difficulty {np.mean([m['difficulty_loss'] for m in recent]):.4f}" if "difficulty_loss" in out
                       else "") + (f" leaves {np.mean([m['leaves'] for m in recent]):.1f}" if "leaves" in out else "")
                log(f"train_ar: step {step + 1}/{cfg.steps} loss {np.mean([m['loss'] for m in recent]):.4f} "
                    f"acc {np.mean([m['acc'] for m in recent]):.3f}{ndp} lr {out['lr']:.2e} | {rate:,.0f} tokens/s")
        if (step + 1) % cfg.checkpoint_every == 0 or last:
            if rank == 0:
                if held_out:
                    metrics[-1].update(trainer.evaluate(held_out))
                    if best["val_loss"] is None or metrics[-1]["val_loss"] < best["val_loss"]:
                        best = {"val_loss": metrics[-1]["val_loss"], "step": step + 1}
                        write_torch(store, "best.pt", export(trainer.model, data, step + 1, best["val_loss"]))
                save_checkpoint(store, step + 1, trainer.state(step + 1, {"step": step + 1}, metrics, best),
                                keep=cfg.keep_checkpoints)
                write_metrics_csv(store, metrics)  # watchable while a long run goes on
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
    final = export(model, data, cfg.steps, metrics[-1].get("val_loss") if metrics else None)
    weights = write_torch(store, "transformer.pt", final)
    if not store.exists("best.pt"):  # no held-out split: the last weights are the best we know
        write_torch(store, "best.pt", final)
    write_metrics_csv(store, metrics)
    from nextdetail.figures import ar_curves, png_bytes

    store.write_bytes("loss.png", png_bytes(ar_curves(metrics, math.log(tcfg.vocab_size))))
    tail = metrics[-min(len(metrics), cfg.log_every):] if metrics else []
    summary = {
        "steps": cfg.steps, "resumed_from": start, "processes": world, "parameters": params,
        "token_maps": len(tcfg.sides), "tokens_per_image": tcfg.L, "vocab_size": tcfg.vocab_size,
        "uniform_loss": round(math.log(tcfg.vocab_size), 4),
        "final_loss": round(float(np.mean([m["loss"] for m in tail])), 4) if tail else None,
        "final_acc": round(float(np.mean([m["acc"] for m in tail])), 4) if tail else None,
        "best_val_loss": None if best["val_loss"] is None else round(best["val_loss"], 4), "best_step": best["step"],
        "seconds_this_run": round(seconds, 2), "tokens_per_s": round(done * tokens_per_step / max(seconds, 1e-9)),
        "url": store.url(), "transformer_sha256": bytes_sha256(weights),
        "weights_sha256": tensors_sha256(final["model"]),
    }
    store.write_bytes("summary.json", json.dumps(summary, indent=1).encode())
    return summary


def write_metrics_csv(store: Store, metrics: list[dict]) -> None:
    columns = ["step", "loss", "acc", "lr", "grad_norm", "val_loss", "val_acc", "difficulty_loss", "leaves"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(metrics)
    store.write_bytes("metrics.csv", buf.getvalue().encode())


# ---- the stage: one process, or torchrun supervised by the Prefect task -----------------------


def _torchrun_main(job_path: str) -> None:
    """One rank under torchrun (`tasks/torchrun.launch`)."""
    job = read_job(job_path)
    try:
        train(Store(*job["store"]), job["data"], ARConfig(**job["cfg"]), log=lambda s: print(s, flush=True))
    finally:
        leave_group()


@stage_task(name="train_ar", retries=2)
def train_ar(artifact: Artifact, data: ARData, cfg: ARConfig, progress: bool = False) -> tuple[dict, list[str]]:
    from prefect import get_run_logger

    logger = get_run_logger()
    nproc = process_count(cfg.nproc, cfg.device)
    if nproc > 1:
        job = {"store": (artifact.store.url(), artifact.store.options), "data": data, "cfg": cfg.model_dump()}
        launch("train_ar", "nextdetail.tasks.train_ar", job, nproc, logger.info)
        summary = json.loads(artifact.store.read_bytes("summary.json"))
    else:
        summary = train(artifact.store, data, cfg, log=logger.info, progress=progress)
    return summary, FILES


def plan_ar(root: Store, key: StageKey, cfg: ARConfig, tcfg: ModelConfig) -> Artifact:
    """The transformer artifact in its own directory under `root`, named by the stage identity: checkpoints
    there belong to exactly this training (another token cache or setting never resumes them)."""
    name = f"{'ndp-' if cfg.model == 'ndp' else ''}d{tcfg.depth}-w{tcfg.C}-maps{len(tcfg.sides)}"
    return Artifact("train_ar", key.identity, root.sub(f"{name}-{key.identity[:12]}"), "_COMPLETE.json",
                    lineage={**key.lineage(), "architecture": asdict(tcfg)})


if __name__ == "__main__":
    _torchrun_main(sys.argv[1])
