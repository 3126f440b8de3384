"""The `train_ar` stage: the token cache → a trained next-detail transformer (CART §3.3, Eq. 13).

Data flow (the stage's parts in this file; the loop in `tasks/training.py`; the models and their
losses in `models/transformer.py` (CART) and `models/ndp.py` (NDP)):
  token cache of `tokenize` ─▶ `TokenBatches`: rank r of W serves disjoint chunks; batch b of epoch e is
    a pure function of (seed, e, r, W, b), so step s's batch needs no replay on resume
  ─▶ `TeacherInputs`: the M token maps ─▶ the inputs of maps 2…M, f̂_{k−1} area-resampled to map k
    (VAR's teacher forcing), by the quantizer of exactly the tokenizer.pt the cache was encoded with
  ─▶ `ARTrainer.step`: the family's loss (CART: cross-entropy over all L tokens), class dropout (CFG), AdamW (β 0.9/0.95, no decay
    on gains/biases/positions), lr = base_lr · batch/base_batch with warm-up and decay, gradient
    clipping, bf16 autocast on CUDA; step s's randomness is seeded by (seed, rank, s), so a resumed run
    repeats an uninterrupted one without carrying RNG state
  ─▶ checkpoints/step-N.pt (atomic: model, optimizer, metrics, data position) every `checkpoint_every`;
    best.pt = the lowest held-out loss so far; at the end transformer.pt, metrics.csv, loss.png,
    summary.json, _COMPLETE.json

Processes (`training.run_training`): one, in the flow's process or on the Dask worker offering `ar.resources`,
or `nproc` data-parallel ones under torchrun there, or `nproc` on each of `ar.nodes` hosts' workers; the Prefect
task supervises them: a crashed process group is an infrastructure failure, retried by Prefect from the last
checkpoint.

Identity: the stage's (pipeline/declaration.py): `ar.*` but runtime knobs, the shard, tokenizer (+ its weights' sha256)
and token-cache identities, and the code its flow imports (the model family's included).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from nextdetail.conf.model_settings import ARConfig
from nextdetail.errors import UserError
from nextdetail.models import FAMILIES, family
from nextdetail.models.transformer import TeacherInputs
from nextdetail.pipeline import training
from nextdetail.pipeline.tasks import Artifact, stage_task
from nextdetail.pipeline.training import Run, Training
from nextdetail.storage.checkpoints import read_torch, tensors_sha256, write_torch
from nextdetail.storage.fs import Store
from nextdetail.storage.hashing import bytes_sha256

if TYPE_CHECKING:
    from nextdetail.pipeline.declaration import StageKey

EXPORT_FORMAT = 1
FILES = ["transformer.pt", "best.pt", "metrics.csv", "loss.png"]


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


def lr_at(cfg: ARConfig, step: int) -> float:
    """The learning rate of `step`: linear warm-up from `warmup_start`·lr, then linear or cosine decay to
    `min_lr_ratio`·lr at the last step (or constant)."""
    return training.scheduled_lr(cfg.lr, step, cfg.steps, cfg.decay, cfg.min_lr_ratio, cfg.warmup_steps,
                                 cfg.warmup_start)


def step_seed(seed: int, rank: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


NO_DECAY = ("pos_start", "pos_1LC", "lvl_embed", "scale_mul_1H11", "q_bias", "v_bias")


class ARTrainer:
    """Model and optimizer of one process (no data): one step, the held-out loss, the checkpoint state."""

    def __init__(self, cfg: ARConfig, tcfg: ModelConfig, teacher: TeacherInputs, device: torch.device,
                 rank: int = 0, world: int = 1) -> None:
        self.cfg, self.tcfg, self.teacher, self.device, self.rank, self.world = cfg, tcfg, teacher, device, rank, world
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.kind = tcfg.kind
        self.models = family(self.kind, "model")
        self.model = self.models.Model(tcfg).to(device)
        self.net: torch.nn.Module = self.model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            (no_decay if p.ndim < 2 or any(k in name for k in NO_DECAY) else decay).append(p)
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)

    def autocast(self) -> Any:
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def objective(self, net: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor, label_smoothing: float,
                  drop_labels: bool | None = None, generator: torch.Generator | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """The model family's own loss (`models/transformer.loss`, `models/ndp.loss`) under bf16 autocast on CUDA."""
        with self.autocast():
            return self.models.loss(self.model, net, self.teacher, tokens, labels,
                                    loss_weighting=self.cfg.loss_weighting, difficulty_weight=self.cfg.difficulty_weight,
                                    label_smoothing=label_smoothing, generator=generator, drop_labels=drop_labels)

    def step(self, step: int, tokens: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        torch.manual_seed(step_seed(self.cfg.seed, self.rank, step))  # class dropout, drop path
        tokens, labels = tokens.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        lr = lr_at(self.cfg, step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.model.train()
        loss, acc, extra = self.objective(self.net, tokens, labels, self.cfg.label_smoothing)
        aux = extra.pop("aux_loss", None)  # CART's detail-difficulty head: trained, not part of the reported loss
        self.opt.zero_grad(set_to_none=True)
        (loss if aux is None else loss + aux).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        out = {"loss": float(loss.detach()), "acc": float(acc), "lr": lr, "grad_norm": float(grad_norm), **extra}
        if self.world > 1:  # the logged numbers are the global batch's (equal shares: the mean of the ranks')
            keys = [k for k in out if k not in ("lr", "grad_norm")]  # those two are already global
            mean = torch.tensor([out[k] for k in keys], dtype=torch.float64)
            torch.distributed.all_reduce(mean)
            out.update({k: float(v) / self.world for k, v in zip(keys, mean, strict=True)})
        return out

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


def export(model: torch.nn.Module, data: ARData, step: int, val_loss: float | None) -> dict[str, Any]:
    """What sampling loads (transformer.pt / best.pt): architecture, weights, and what they belong to."""
    return {"format": EXPORT_FORMAT, "kind": model.cfg.kind, "config": asdict(model.cfg),
            "model": model.state_dict(), "step": step,
            "val_loss": val_loss, "classes": list(data.classes), "token_cache": data.tokens_identity,
            "tokenizer": {"url": data.tokenizer_url, "sha256": data.tokenizer_sha256}}


def _not_an_export(saved: dict) -> str | None:
    """Why `saved` (a dict of the export format) is not what `export` writes; None when it is. Sampling reads
    each of these (the tokenizer's url and sha256 find and check its tokenizer)."""
    tokenizer = saved.get("tokenizer")
    if not (isinstance(tokenizer, dict) and isinstance(tokenizer.get("url"), str)
            and isinstance(tokenizer.get("sha256"), str)):
        return "no tokenizer url and sha256"
    if not (isinstance(saved.get("config"), dict) and isinstance(saved.get("model"), dict)):
        return "no config and weights"
    if not (isinstance(saved.get("classes"), list) and isinstance(saved.get("step"), int)):
        return "no class names and step"
    if saved.get("kind", "cart") not in FAMILIES:
        return f"model kind {saved['kind']!r}"
    return None


def load_transformer(checkpoint: bytes | str, map_location: str = "cpu",
                     where: str | None = None) -> tuple[torch.nn.Module, dict]:
    """An exported model (eval mode) — `NextDetailTransformer` (kind cart) or `NextDetailMaskedTransformer`
    (kind ndp) — and its record (classes, tokenizer url + sha256, step, …)."""
    where = where or ("transformer checkpoint" if isinstance(checkpoint, bytes) else checkpoint)
    fix = "delete it and re-run `nextdetail train-ar`, or pass a transformer.pt / best.pt that it wrote"
    saved = read_torch(checkpoint, where, map_location, fix=fix)
    if not isinstance(saved, dict) or saved.get("format") != EXPORT_FORMAT:
        raise UserError(f"{where}: not a transformer.pt/best.pt "
                        "of `nextdetail train-ar` (a step checkpoint? use the run's transformer.pt)")
    why = _not_an_export(saved)
    if why is None:
        try:
            models = family(saved.get("kind", "cart"), "model")
            c = saved["config"]
            model = models.Model(models.Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in c.items()}))
            model.load_state_dict(saved["model"])
        except (TypeError, ValueError, AssertionError, RuntimeError) as err:  # a config or weights of another shape
            why = f"its config or weights do not fit the model: {(str(err).splitlines() or [''])[0][:120]}"
    if why is not None:
        raise UserError(f"{where}: not written by nextdetail ({why}); {fix}")
    return model.eval(), saved


# ---- training: the stage's parts of the one loop (tasks/training.py) ----------------------------


class ARTraining(Training):
    """The token cache's batches through `ARTrainer`; held-out loss and best.pt at each checkpoint."""

    stage, section, lr_setting, files = "train_ar", "ar", "ar.base_lr", FILES

    def __init__(self, data: ARData, cfg: ARConfig) -> None:
        self.data, self.settings = data, cfg

    def to_job(self) -> dict[str, Any]:
        return {"data": {f.name: getattr(self.data, f.name) for f in fields(ARData)},
                "settings": self.settings.model_dump(mode="json")}

    @classmethod
    def from_job(cls, job: dict[str, Any]) -> ARTraining:
        return cls(ARData(**{**job["data"], "classes": tuple(job["data"]["classes"])}),
                   ARConfig.model_validate(job["settings"]))

    def build(self, rank: int, world: int, device: torch.device, log: Callable[[str], None]) -> None:
        from nextdetail.storage.token_loader import TokenBatches

        cfg = self.cfg = self.settings
        if cfg.batch_size % world:
            raise UserError(f"ar.batch_size={cfg.batch_size} does not split over {world} processes; make it a multiple")
        cache = self.data.open_cache()
        tokenizer = self.data.tokenizer(device)
        tcfg = self.tcfg = transformer_config(cfg, cache.layout, len(self.data.classes), tokenizer.spec.z_channels)
        self.loader = TokenBatches(cache, cfg.split, cfg.batch_size // world, cfg.seed, rank=rank, world=world)
        self.held_out = []
        if cfg.val_split is not None and rank == 0:
            val = TokenBatches(cache, cfg.val_split, min(cfg.batch_size, 64), seed=0, rank=0, world=1)
            self.held_out = [val[(0, b)] for b in range(min(cfg.val_batches, val.batches_per_epoch))]
        self.trainer = ARTrainer(cfg, tcfg, TeacherInputs(tokenizer, tcfg.sides), device, rank, world)
        self.parameters = sum(p.numel() for p in self.trainer.model.parameters())
        self.best: dict[str, Any] = {"val_loss": None, "step": None}

    def batches(self, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches from global step `start` on, epoch after epoch."""
        epoch, b = divmod(start, self.loader.batches_per_epoch)
        while True:
            yield from self.loader.epoch(epoch, self.cfg.loader_workers, start=b)
            epoch, b = epoch + 1, 0

    def step(self, step: int, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
        return self.trainer.step(step, *batch)

    def state(self, step: int) -> dict[str, Any]:
        return {"data_position": {"step": step}, "best": self.best, "model": self.trainer.model.state_dict(),
                "opt": self.trainer.opt.state_dict(), "scaler": None}  # bf16 autocast needs no loss scaling

    def load(self, state: dict[str, Any]) -> None:
        self.trainer.model.load_state_dict(state["model"])
        self.trainer.opt.load_state_dict(state["opt"])
        self.best = state["best"]

    def started(self, world: int) -> str | None:
        t, cfg = self.tcfg, self.cfg
        return (f"train_ar: {self.parameters / 1e6:.2f} M parameters, {len(t.sides)} token maps ({t.L} tokens), "
                f"vocabulary {t.vocab_size} (uniform loss {math.log(t.vocab_size):.3f}), {world} process(es), "
                f"lr {cfg.lr:.2e}")

    def log_line(self, step: int, metrics: list[dict[str, Any]], run: Run) -> str:
        recent, out = metrics[-self.cfg.log_every:], metrics[-1]
        rate = run.steps_done * self.cfg.batch_size * self.tcfg.L / max(run.seconds, 1e-9)
        ndp = (f" difficulty {np.mean([m['difficulty_loss'] for m in recent]):.4f}" if "difficulty_loss" in out
               else "") + (f" leaves {np.mean([m['leaves'] for m in recent]):.1f}" if "leaves" in out else "")
        return (f"train_ar: step {step}/{self.cfg.steps} loss {np.mean([m['loss'] for m in recent]):.4f} "
                f"acc {np.mean([m['acc'] for m in recent]):.3f}{ndp} lr {out['lr']:.2e} | {rate:,.0f} tokens/s")

    def checkpointing(self, store: Store, step: int, metrics: list[dict[str, Any]]) -> None:
        if self.held_out:
            metrics[-1].update(self.trainer.evaluate(self.held_out))
            if self.best["val_loss"] is None or metrics[-1]["val_loss"] < self.best["val_loss"]:
                self.best = {"val_loss": metrics[-1]["val_loss"], "step": step}
                write_torch(store, "best.pt", export(self.trainer.model, self.data, step, self.best["val_loss"]))
        write_metrics_csv(store, metrics)  # watchable while a long run goes on

    def finish(self, store: Store, metrics: list[dict[str, Any]], run: Run) -> dict[str, Any]:
        """transformer.pt (and best.pt without a held-out split), metrics.csv, loss.png."""
        cfg, tcfg, best = self.cfg, self.tcfg, self.best
        model = self.trainer.model.eval()
        final = export(model, self.data, cfg.steps, metrics[-1].get("val_loss") if metrics else None)
        weights = write_torch(store, "transformer.pt", final)
        if not store.exists("best.pt"):  # no held-out split: the last weights are the best we know
            write_torch(store, "best.pt", final)
        write_metrics_csv(store, metrics)
        from nextdetail.figures import ar_curves, png_bytes

        store.write_bytes("loss.png", png_bytes(ar_curves(metrics, math.log(tcfg.vocab_size))))
        tail = metrics[-min(len(metrics), cfg.log_every):] if metrics else []
        return {
            "parameters": self.parameters, "token_maps": len(tcfg.sides), "tokens_per_image": tcfg.L,
            "vocab_size": tcfg.vocab_size, "uniform_loss": round(math.log(tcfg.vocab_size), 4),
            "final_loss": round(float(np.mean([m["loss"] for m in tail])), 4) if tail else None,
            "final_acc": round(float(np.mean([m["acc"] for m in tail])), 4) if tail else None,
            "best_val_loss": None if best["val_loss"] is None else round(best["val_loss"], 4), "best_step": best["step"],
            "tokens_per_s": round(run.steps_done * cfg.batch_size * tcfg.L / max(run.seconds, 1e-9)),
            "transformer_sha256": bytes_sha256(weights), "weights_sha256": tensors_sha256(final["model"]),
        }


def train(store: Store, data: ARData, cfg: ARConfig, log: Callable[[str], None] = print, progress: bool = False,
          stop_after: int | None = None) -> dict[str, Any]:
    """Train (or resume) in `store` in this process (the loop of `tasks/training.py`); rank 0's summary."""
    return training.train(store, ARTraining(data, cfg), log, progress, stop_after)


def write_metrics_csv(store: Store, metrics: list[dict]) -> None:
    columns = ["step", "loss", "acc", "lr", "grad_norm", "val_loss", "val_acc", "difficulty_loss", "leaves"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(metrics)
    store.write_bytes("metrics.csv", buf.getvalue().encode())


# ---- the stage --------------------------------------------------------------------------------


@stage_task(name="train_ar", retries=2)
def train_ar(artifact: Artifact, data: ARData, cfg: ARConfig, progress: bool = False) -> tuple[dict, list[str]]:
    return training.run_training(artifact.store, ARTraining(data, cfg), progress, run_id=artifact.identity)


@stage_task(name="adopt_transformer", retries=1)
def adopt_transformer(artifact: Artifact, data: ARData, cfg: ARConfig, source: str, options: dict
                      ) -> tuple[dict, list[str]]:
    """`ar.pretrained`: VAR's released transformer as this stage's artifact instead of a training run — exported
    as transformer.pt / best.pt (step 0) so that sample and evaluate read it as any other."""
    from nextdetail.models.transformer import load_var_state_dict
    from nextdetail.storage.checkpoints import read_released

    where = f"ar.pretrained={source}"
    tokenizer = data.tokenizer()
    tcfg = transformer_config(cfg, data.open_cache().layout, len(data.classes), tokenizer.spec.z_channels)
    if tcfg.kind != "cart" or tcfg.n_base is not None:
        raise UserError(f"{where}: VAR's transformers predict VAR's scales: use ar.model=cart with tokenizer.order=0")
    model = family("cart", "model").Model(tcfg)
    try:
        load_var_state_dict(model, read_released("ar.pretrained", source, options))
    except ValueError as err:
        raise UserError(f"{where}: {err}; ar.depth/width/heads, the token cache's maps and vocabulary and the "
                        f"dataset's {len(data.classes)} classes must describe this file") from None
    final = export(model.eval(), data, 0, None)
    weights = write_torch(artifact.store, "transformer.pt", final)
    write_torch(artifact.store, "best.pt", final)
    summary = {"adopted_from": source, "layout": "var", "steps": 0, "best_step": 0, "best_val_loss": None,
               "parameters": sum(p.numel() for p in model.parameters()),
               "token_maps": len(tcfg.sides), "tokens_per_image": tcfg.L, "vocab_size": tcfg.vocab_size,
               "url": artifact.store.url(), "transformer_sha256": bytes_sha256(weights),
               "weights_sha256": tensors_sha256(final["model"])}
    artifact.store.write_bytes("summary.json", json.dumps(summary, indent=1).encode())
    return summary, ["transformer.pt", "best.pt", "summary.json"]


def plan_ar(root: Store, key: StageKey, cfg: ARConfig, tcfg: ModelConfig) -> Artifact:
    """The transformer artifact in its own directory under `root`, named by the stage identity: checkpoints
    there belong to exactly this training (another token cache or setting never resumes them)."""
    name = f"{'ndp-' if cfg.model == 'ndp' else ''}d{tcfg.depth}-w{tcfg.C}-maps{len(tcfg.sides)}"
    return Artifact("train_ar", key.identity, root.sub(f"{name}-{key.identity[:12]}"), "_COMPLETE.json",
                    lineage={**key.lineage(), "architecture": asdict(tcfg)})

