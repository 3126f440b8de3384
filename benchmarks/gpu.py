"""Every GPU path of nextdetail measured by one command, sized for a short GPU lease (issue 36).

On the lent GPU machine (one H200; Python with torch, numpy, scipy and scikit-image, none of the pipeline's
other dependencies, no network), from the repository root:

    PYTHONPATH=. python benchmarks/gpu.py          # `make gpu-check` where the project's venv exists

(the script puts the repository root on sys.path itself, so PYTHONPATH is belt and braces; where the tree
travels without .git, NEXTDETAIL_COMMIT=<sha> records the commit). One process, inside 8 minutes with its
start-up by construction: six parts, each with a wall-clock budget (BUDGET_S, 365 s in all: measurements stop
early to fit, a signal cuts a part off GRACE_S later) and a watchdog that ends the run at TOTAL_S = 465 s
whatever hangs; the CPU solver's JIT build runs in a background thread meanwhile. A part that fails or runs
out of time is reported with its error and what it measured so far, and the next part still runs. Each part prints one JSON line on stdout as it ends (figure, value,
baseline = the goal, ratio = value / baseline, device, dtype, batch, ok, error, seconds and the part's own
fields); the whole run — date, device, torch, commit and every part — goes to --out (default
benchmarks/out/gpu.json), rewritten after each part so a killed run keeps what it measured; a one-screen
table ends the run on stderr. The numbers go into docs/results.md with the date, the device and the commit.

1. decomposition: the Ambrosio–Tortorelli solver (`models/mumford_shah.py`, the shipped settings: ATConfig's
   defaults = decompose.* of conf/presets/imagenet256.yaml) at 256 px, order 3, batches 64–512: images/s
   and peak memory; the same 16 photographs (scikit-image's) on the CPU solver: relative RMS of the base
   factors per order against the detail it extracts, bound = the CG tolerance; and the CPU solver on one
   core, per image, for the same-work ratio. Goal 5,000 images/s.
2. tokenizer: VAR's architecture (ch 160, V 4096, z 32), seeded weights: `img_to_indices` images/s at 256 px
   in fp32 (what the tokens stage runs) and under bf16 autocast; token agreement bf16 vs fp32 (%).
   Goal 3,000 images/s.
3. transformer: VAR-d16 shapes, seeded weights, one bf16-autocast training step (the model's own loss, AdamW,
   clipping, as train_ar): tokens/s, MFU (FLOPs in the JSON: 3 × the forward's matrix products of
   `models/flops.py`, H200 bf16 dense peak 989 TFLOP/s), peak memory at batch 64; d30's peak at batch 16.
   Goal 40 % MFU.
4. sampling: `CARTSampler`, d16, KV cache, CFG 1.5, top-k 900, top-p 0.96 (the preset's), batch 64, decode
   included: images/s for VAR's 10 maps and for CART's order-3 schedule (13 maps).
5. evaluation: Inception-v3 features (torch-fidelity's network with seeded weights, else torchvision's
   inception_v3 as a same-shape stand-in; nothing is downloaded) images/s at the evaluate batch (200),
   and our random-conv extractor beside it.
6. distributed: `torchrun --nproc-per-node 1` (as `python -m torch.distributed.run`) with NCCL: initialise,
   two DDP training steps of a small transformer, destroy the process group: ok and seconds.

Without a GPU, `python benchmarks/gpu.py --device cpu --quick` runs every part on tiny shapes (32 px, d2) in
well under a minute: tests/test_gpu_check.py runs it. `--parts 1,3` or `--parts tokenizer` runs a subset.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STARTED = time.monotonic()  # the 8 minutes count from here, torch's import included
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # `python benchmarks/gpu.py` without installing the package

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from nextdetail.models.configs import TokenizerSpec, TransformerConfig  # noqa: E402

PARTS = ("decomposition", "tokenizer", "transformer", "sampling", "evaluation", "distributed")
GOALS = {"decomposition": 5000.0, "tokenizer": 3000.0, "transformer": 40.0}  # images/s, images/s, MFU %
UNITS = {"decomposition": "img/s", "tokenizer": "img/s", "transformer": "MFU %", "sampling": "img/s",
         "evaluation": "img/s", "distributed": "s"}
# Each part's wall-clock budget: measurements stop early to stay inside it, a signal cuts it off GRACE_S later,
# and a watchdog ends the whole run at TOTAL_S whatever hangs (8 minutes less a margin for the lease's start).
BUDGET_S = {"decomposition": 100, "tokenizer": 45, "transformer": 75, "sampling": 55, "evaluation": 30,
            "distributed": 60}
GRACE_S = 10
TOTAL_S = 465
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}  # dense, no sparsity (vendor datasheets)
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "retina", "hubble_deep_field",
          "motorcycle")
WORKER_MARK = "GPU_CHECK_WORKER "  # prefix of the distributed worker's JSON line


@dataclass(frozen=True)
class Sizes:
    """The shapes of one run: the real ones, or tiny ones that run everything on a CPU in seconds."""

    side: int  # image side, px
    decompose_batches: tuple[int, ...]
    cpu_images: int  # images the one-core CPU solver is timed on
    tokenizer: TokenizerSpec  # order 0 (VAR); CART's order 3 is the same with order=3
    encode_batch: int
    depth: int  # the transformer trained and sampled
    train_batch: int
    big_depth: int  # the one whose peak memory is measured
    big_train_batch: int
    sample_batch: int
    eval_batch: int
    ddp_depth: int
    reps: int  # timed calls per measurement (fewer when the budget runs short)


FULL = Sizes(side=256, decompose_batches=(64, 128, 256, 512), cpu_images=8, tokenizer=TokenizerSpec(),
             encode_batch=128, depth=16, train_batch=64, big_depth=30, big_train_batch=16, sample_batch=64,
             eval_batch=200, ddp_depth=4, reps=5)
QUICK = Sizes(side=32, decompose_batches=(4, 8), cpu_images=2,
              tokenizer=TokenizerSpec(vocab_size=64, z_channels=8, ch=16, ch_mult=(1, 2, 2), resolution=32,
                                      patch_nums=(1, 2, 4, 8)),
              encode_batch=4, depth=2, train_batch=4, big_depth=3, big_train_batch=2, sample_batch=4, eval_batch=2,
              ddp_depth=1, reps=2)


# ---- time, memory -----------------------------------------------------------------------------------------


class PartTimeout(Exception):
    """A part ran past its wall-clock budget."""


class Budget:
    """A part's wall-clock budget: measurements ask it whether another one fits."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.start = seconds, time.perf_counter()

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def allows(self, seconds: float) -> bool:
        return self.left() > seconds


@contextlib.contextmanager
def hard_deadline(seconds: float) -> Iterator[list[bool]]:
    """Raise PartTimeout in this (main) thread after `seconds`: a part that overruns in Python, between GPU ops
    or in a subprocess wait, is cut off there and the next part still runs. Yields [fired]: code that catches
    the exception on its way (a lazy import wraps it in another error) cannot hide that it fired."""
    fired = [False]

    def expire(signum: int, frame: Any) -> None:
        fired[0] = True
        raise PartTimeout(f"ran past its budget (+{GRACE_S} s)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak allocated by torch since the last reset (None on a CPU: torch does not count host memory)."""
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def throughput(fn: Callable[[], Any], items: int, device: torch.device, budget: Budget, reps: int) -> float:
    """Items per second of `fn` after one warm-up call (allocator, kernel selection): up to `reps` timed
    calls, fewer when another would eat into the last third of the budget (the part's other measurements)."""
    fn()
    synchronize(device)
    done, t0 = 0, time.perf_counter()
    while done < reps:
        fn()
        synchronize(device)
        done += 1
        per_call = (time.perf_counter() - t0) / done
        if not budget.allows(per_call + budget.seconds / 3):
            break
    return items * done / (time.perf_counter() - t0)


def counted_gflops(fn: Callable[[], Any]) -> float:
    """FLOPs of one call of `fn` as torch counts them (convolutions and matrix products), in GFLOP."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def bf16_autocast(device: torch.device) -> Any:
    return torch.autocast(device.type, dtype=torch.bfloat16)


# ---- inputs and models ------------------------------------------------------------------------------------


def real_photos(side: int) -> tuple[torch.Tensor, str]:
    """16 real RGB images (16, 3, side, side) in [0, 1]: each of scikit-image's 8 colour photographs as its
    centre square resized to `side` and as a `side`-px centre crop at native scale (fine texture the resize
    smooths away). Seeded synthetic images (piecewise-constant patches and noise) if scikit-image fails."""
    try:
        from skimage import data

        views = []
        for name in PHOTOS:
            img = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
            x = torch.from_numpy(np.ascontiguousarray(img[..., :3])).permute(2, 0, 1).float() / 255  # (3, H, W)
            h, w = x.shape[1:]
            s = min(h, w)
            square = x[:, (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
            views.append(F.interpolate(square[None], size=(side, side), mode="bilinear", antialias=True,
                                       align_corners=False)[0].clamp(0, 1))
            views.append(x[:, (h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side])
        return torch.stack(views).contiguous(), "scikit-image photographs"
    except Exception as err:  # a missing or partial scikit-image must not cost the other numbers
        g = torch.Generator().manual_seed(0)
        blocks = torch.rand(16, 3, 8, 8, generator=g)
        x = F.interpolate(blocks, size=(side, side), mode="nearest") + 0.05 * torch.randn(16, 3, side, side, generator=g)
        return x.clamp(0, 1), f"synthetic (scikit-image failed: {type(err).__name__}: {err})"


def tiled(images: torch.Tensor, n: int) -> torch.Tensor:
    """`n` images cycling through `images` (n, …)."""
    return images.repeat((math.ceil(n / len(images)),) + (1,) * (images.ndim - 1))[:n].contiguous()


def seeded_tokenizer(spec: TokenizerSpec, device: torch.device, seed: int = 0) -> Any:
    from nextdetail.models.tokenizer import BaseDetailVQVAE

    torch.manual_seed(seed)
    with torch.device(device):  # built and initialised on the device: no host copy of the weights
        return BaseDetailVQVAE(spec).eval()


def transformer_config(spec: TokenizerSpec, depth: int) -> TransformerConfig:
    """The CART transformer over `spec`'s token schedule, as train_ar's `transformer_config` builds it."""
    from nextdetail.models.quant import schedule_of

    schedule = schedule_of(spec)
    sides = tuple(m.side for m in schedule)
    n_base = sum(1 for m in schedule if m.source == 0)
    return TransformerConfig(sides=sides, n_base=n_base if n_base < len(sides) else None,
                             vocab_size=spec.vocab_size, cvae=spec.z_channels, depth=depth)


def seeded_transformer(cfg: TransformerConfig, device: torch.device, seed: int = 0) -> Any:
    from nextdetail.models.transformer import NextDetailTransformer

    torch.manual_seed(seed)
    with torch.device(device):
        return NextDetailTransformer(cfg)


def forward_flops_per_image(cfg: TransformerConfig) -> float:
    """Teacher-forced forward FLOPs of one image (matrix products, `models/flops.py`): the blocks over all L
    tokens attending to all L (the block-causal mask is applied to a full L×L score matrix), the head, and
    word_embed of the L − first_l inputs."""
    from nextdetail.models.flops import transformer_flops

    blocks = transformer_flops(cfg.depth, cfg.C, cfg.mlp_hidden, cfg.L, cfg.L)
    return blocks + 2 * cfg.L * cfg.C * cfg.vocab_size + 2 * (cfg.L - cfg.first_l) * cfg.cvae * cfg.C


def peak_bf16_flops(device: torch.device, override_tflops: float | None) -> tuple[float | None, str]:
    """The denominator of MFU and where it comes from (None on a CPU or an unknown GPU without --peak-tflops)."""
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    if device.type != "cuda":
        return None, "no peak for a CPU"
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops, f"{key} bf16 dense peak"
    return None, f"unknown peak for {name}: pass --peak-tflops"


# ---- the parts --------------------------------------------------------------------------------------------


@dataclass
class Run:
    device: torch.device
    sizes: Sizes
    quick: bool
    peak_tflops: float | None
    photos: torch.Tensor  # (16, 3, side, side) in [0, 1], on the host
    photos_source: str
    cpu_build: threading.Thread | None = None  # the compiled CPU solver, built while the GPU works

    def wait_for_cpu_solver(self, budget: Budget) -> str:
        """'compiled' or 'eager': which CPU solver runs (waits for the background build, within the budget)."""
        from nextdetail.models import mumford_shah

        if self.cpu_build is not None:
            self.cpu_build.join(timeout=max(budget.left(), 0))
            if self.cpu_build.is_alive():
                raise PartTimeout("the compiled CPU solver was still building")
        return "compiled" if mumford_shah.cpu_kernels() is not None else "eager"


def part_decomposition(run: Run, budget: Budget, out: dict[str, Any]) -> None:
    from nextdetail.models.mumford_shah import ATConfig, decompose, details

    cfg, order, dev = ATConfig(), 3, run.device  # ATConfig() = the shipped decompose.* settings
    out.update(figure=f"decomposition images/s ({run.sizes.side} px, order {order}, shipped settings)",
               dtype="float32", settings=vars(cfg), images=run.photos_source, per_batch=[])
    if dev.type == "cpu":  # the "device" solve is the CPU solver itself: it must be built first
        run.wait_for_cpu_solver(budget)
    for batch in run.sizes.decompose_batches:
        if out["per_batch"]:
            last = out["per_batch"][-1]
            if not budget.allows(4 * batch / last["images_per_s"] + 25):  # warm-up + a timed call, + the CPU side
                out["per_batch"].append({"batch": batch, "skipped": "budget"})
                break
        x = tiled(run.photos, batch).to(dev)
        reset_peak_memory(dev)
        rate = throughput(lambda x=x: decompose(x, order, cfg), batch, dev, budget, reps=2)
        out["per_batch"].append({"batch": batch, "images_per_s": round(rate, 1), "peak_memory_gib": peak_memory_gib(dev)})
        del x
        free_memory(dev)
        best = max((b for b in out["per_batch"] if "images_per_s" in b), key=lambda b: b["images_per_s"])
        out.update(value=best["images_per_s"], batch=best["batch"], peak_memory_gib=best["peak_memory_gib"])

    out["cpu_solver"] = run.wait_for_cpu_solver(budget)
    photos = run.photos
    bases_dev = decompose(photos.to(dev), order, cfg).cpu()  # (order, 16, 3, S, S)
    bases_cpu = decompose(photos, order, cfg)  # all cores
    detail_rms = details(photos, bases_cpu).square().mean((1, 2, 3, 4)).sqrt()  # (order,)
    diff = bases_dev - bases_cpu
    rel_rms = (diff.square().mean((1, 2, 3, 4)).sqrt() / detail_rms.clamp_min(1e-12)).tolist()
    out["agreement"] = {
        "images": len(photos), "what": "RMS(B_k on the device − B_k on the CPU solver) / RMS(D_k), per order k",
        "relative_rms": [float(f"{v:.3g}") for v in rel_rms],
        "bound": cfg.cg_tol, "bound_is": "the CG tolerance (devices agree to within the solver tolerance)",
        "within_bound": all(v <= cfg.cg_tol for v in rel_rms), "max_abs": float(f"{diff.abs().max():.3g}"),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        n = run.sizes.cpu_images
        cpu_rate = throughput(lambda: decompose(photos[:n], order, cfg), n, torch.device("cpu"), budget, reps=1)
    finally:
        torch.set_num_threads(threads)
    out.update(cpu_one_core_images_per_s=round(cpu_rate, 2), same_work_ratio=round(out["value"] / cpu_rate, 1))


def part_tokenizer(run: Run, budget: Budget, out: dict[str, Any]) -> None:
    from nextdetail.models.tokenizer import to_model_range

    dev, spec, batch = run.device, run.sizes.tokenizer, run.sizes.encode_batch
    out.update(figure=f"tokenizer encode images/s ({spec.resolution} px, ch {spec.ch}, V {spec.vocab_size}, fp32)",
               dtype="float32", batch=batch, weights="seeded (torch.manual_seed(0))",
               note="fp32 is what the tokens stage runs; bf16 = the same call under torch.autocast(bfloat16)")
    model = seeded_tokenizer(spec, dev)
    x = to_model_range(tiled(run.photos, batch)).to(dev)  # (B, 3, S, S) in [-1, 1]
    reset_peak_memory(dev)
    fp32 = throughput(lambda: model.img_to_indices(x), batch, dev, budget, reps=run.sizes.reps)
    out.update(value=round(fp32, 1), peak_memory_gib=peak_memory_gib(dev))

    def encode_bf16(images: torch.Tensor) -> list[torch.Tensor]:
        with bf16_autocast(dev):
            return model.img_to_indices(images)

    bf16 = throughput(lambda: encode_bf16(x), batch, dev, budget, reps=run.sizes.reps)
    out.update(images_per_s_bf16=round(bf16, 1), bf16_speedup=round(bf16 / fp32, 2))
    photos = to_model_range(run.photos).to(dev)
    gflops = counted_gflops(lambda: model.img_to_indices(photos[:1]))
    out.update(gflops_per_image=round(gflops, 2), tflops_per_s_fp32=round(gflops * fp32 / 1e3, 2))
    maps_fp32, maps_bf16 = model.img_to_indices(photos), encode_bf16(photos)
    per_map = [float((a == b).float().mean()) * 100 for a, b in zip(maps_fp32, maps_bf16, strict=True)]
    tokens = [a.numel() for a in maps_fp32]
    overall = sum(p * t for p, t in zip(per_map, tokens, strict=True)) / sum(tokens)
    out.update(token_agreement_bf16_vs_fp32_pct=round(overall, 2),
               token_agreement_per_map_pct=[round(p, 1) for p in per_map],
               agreement_images=f"{len(run.photos)} {run.photos_source}")


def training_step(model: Any, tokenizer: Any, batch: int, device: torch.device) -> Callable[[], torch.Tensor]:
    """One train_ar step on random tokens: the model's own loss under bf16 autocast on CUDA (fp32 on a CPU, as
    train_ar), AdamW (0.9, 0.95, wd 0.05), gradient clipping at 2."""
    from nextdetail.models.transformer import TeacherInputs, loss

    cfg = model.cfg
    teacher = TeacherInputs(tokenizer, cfg.sides)
    g = torch.Generator(device).manual_seed(1)
    tokens = torch.randint(cfg.vocab_size, (batch, cfg.L), device=device, generator=g)
    labels = torch.randint(cfg.num_classes, (batch,), device=device, generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    model.train()

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            value, _, _ = loss(model, model, teacher, tokens, labels)
        opt.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()
        return value

    return step


def part_transformer(run: Run, budget: Budget, out: dict[str, Any]) -> None:
    dev, sizes = run.device, run.sizes
    cfg = transformer_config(sizes.tokenizer, sizes.depth)
    flops_per_step = 3 * sizes.train_batch * forward_flops_per_image(cfg)
    peak_flops, peak_from = peak_bf16_flops(dev, run.peak_tflops)
    out.update(figure=f"d{sizes.depth} training MFU % (batch {sizes.train_batch}, {cfg.L} tokens per image)",
               dtype="bfloat16 autocast" if dev.type == "cuda" else "float32", batch=sizes.train_batch,
               weights="seeded (VAR's init, torch.manual_seed(0))", flops_per_step=flops_per_step,
               peak_flops=peak_flops, peak_flops_from=peak_from,
               flops_formula="3 × batch × [transformer_flops(depth, C, 4C, L, L) + 2·L·C·V + 2·(L − first_l)·Cvae·C]; "
                             "transformer_flops (models/flops.py) = depth × (8·L·C² + 4·L²·C + 16·L·C² + 12·C²) + 4·C²: "
                             "matrix products only, the forward ×3 for forward + backward; MFU = FLOPs/s ÷ peak")
    tokenizer = seeded_tokenizer(sizes.tokenizer, dev)
    model = seeded_transformer(cfg, dev)
    out["params"] = sum(p.numel() for p in model.parameters())
    step = training_step(model, tokenizer, sizes.train_batch, dev)
    step()  # the optimizer's state exists from here: the peak below is a steady step's
    reset_peak_memory(dev)
    steps_per_s = throughput(step, 1, dev, budget, reps=sizes.reps)
    out.update(steps_per_s=round(steps_per_s, 3), tokens_per_s=round(steps_per_s * sizes.train_batch * cfg.L),
               peak_memory_gib=peak_memory_gib(dev))
    if peak_flops:
        out["value"] = round(100 * flops_per_step * steps_per_s / peak_flops, 1)
    del model, step
    free_memory(dev)

    out["peak_includes"] = "the seeded tokenizer on the device (its quantizer makes the teacher inputs, as in train_ar)"
    big = out["big_model"] = {"depth": sizes.big_depth, "batch": sizes.big_train_batch,
                              "activation_checkpointing": "not supported: NextDetailTransformer has no checkpointing "
                                                          "option; the peak is without it"}
    if not budget.allows(20):
        big["skipped"] = "budget"
        return
    reset_peak_memory(dev)
    model = seeded_transformer(transformer_config(sizes.tokenizer, sizes.big_depth), dev)
    big["params"] = sum(p.numel() for p in model.parameters())
    step = training_step(model, tokenizer, sizes.big_train_batch, dev)
    t0 = time.perf_counter()
    for _ in range(2):  # the second step holds weights, gradients and AdamW's state at once
        step()
    synchronize(dev)
    big.update(peak_memory_gib=peak_memory_gib(dev), seconds_two_steps=round(time.perf_counter() - t0, 2))


def part_sampling(run: Run, budget: Budget, out: dict[str, Any]) -> None:
    from nextdetail.models.sampler import CARTSampler

    dev, sizes, batch = run.device, run.sizes, run.sizes.sample_batch
    guidance = dict(cfg=1.5, top_k=900, top_p=0.96)  # conf/presets/imagenet256.yaml sample.*
    out.update(figure=f"d{sizes.depth} sampling images/s (KV cache, CFG, {sizes.side} px, decode included)",
               dtype="float32", batch=batch, guidance=guidance, weights="seeded",
               note="fp32 is what the sample stage runs")
    labels = torch.arange(batch, device=dev) % 1000
    for name, order in (("var", 0), ("cart_order3", 3)):
        if out["value"] is not None and not budget.allows(3 * batch / out["value"] + 10):
            out[name] = {"skipped": "budget"}
            continue
        spec = TokenizerSpec(**{**sizes.tokenizer.to_dict(), "order": order})
        sampler = CARTSampler(seeded_transformer(transformer_config(spec, sizes.depth), dev), seeded_tokenizer(spec, dev))
        g = torch.Generator(dev).manual_seed(0)
        reset_peak_memory(dev)
        rate = throughput(lambda s=sampler, g=g: s.sample(labels, generator=g, **guidance), batch, dev, budget,
                          reps=min(3, sizes.reps))
        out[name] = {"images_per_s": round(rate, 2), "maps": sampler.forward_passes,
                     "gflops_per_image": round(sampler.flops_per_image / 1e9, 2), "peak_memory_gib": peak_memory_gib(dev)}
        if name == "var":
            out["value"] = out[name]["images_per_s"]
        del sampler
        free_memory(dev)


def seeded_inception(device: torch.device) -> tuple[torch.nn.Module, str]:
    """Inception-v3 with seeded random weights, taking uint8 images (B, 3, H, W): torch-fidelity's FID network
    (what evaluate runs) if torch-fidelity imports, else torchvision's inception_v3 behind the same resize and
    scaling (the same layer shapes: a throughput stand-in). Nothing is downloaded."""
    torch.manual_seed(0)
    try:
        from torch_fidelity import feature_extractor_inceptionv3 as tfi
    except ImportError:
        tfi = None
    if tfi is not None:

        class SeededInceptionV3(tfi.FeatureExtractorInceptionV3):
            def load_state_dict(self, state_dict: Any, *args: Any, **kwargs: Any) -> Any:
                return None if state_dict is None else super().load_state_dict(state_dict, *args, **kwargs)

        download = tfi.load_state_dict_from_url
        tfi.load_state_dict_from_url = lambda *args, **kwargs: None  # its constructor fetches the weights: keep the seeded ones
        try:
            model = SeededInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])
        finally:
            tfi.load_state_dict_from_url = download
        return model.to(device), "torch-fidelity inception-v3-compat"
    try:
        from torchvision.models import inception_v3
    except ImportError:
        raise RuntimeError("neither torch-fidelity nor torchvision imports here: no Inception-v3 to build") from None

    class TorchvisionInception(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = inception_v3(weights=None, aux_logits=False, init_weights=False).eval()

        def forward(self, x_uint8: torch.Tensor) -> torch.Tensor:
            x = F.interpolate(x_uint8.float(), size=(299, 299), mode="bilinear", align_corners=False)
            return self.net((x - 128) / 128)

    return TorchvisionInception().requires_grad_(False).to(device), "torchvision inception_v3 (stand-in)"


def part_evaluation(run: Run, budget: Budget, out: dict[str, Any]) -> None:
    from nextdetail.models.feature_extractor import RANDCONV, RandomConvFeatures

    dev, batch = run.device, run.sizes.eval_batch
    out.update(figure=f"Inception-v3 features images/s ({run.sizes.side} px uint8 → 299 px)", dtype="float32",
               batch=batch, weights="seeded")
    x = (tiled(run.photos, batch) * 255).round().to(torch.uint8).to(dev)  # what evaluate feeds: uint8 (B, 3, H, W)
    randconv = RandomConvFeatures(RANDCONV, ["features", "logits"]).to(dev)
    with torch.no_grad():
        out["randconv_images_per_s"] = round(throughput(lambda: randconv(x), batch, dev, budget, reps=run.sizes.reps), 1)
    model, out["network"] = seeded_inception(dev)
    reset_peak_memory(dev)
    with torch.no_grad():
        rate = throughput(lambda: model(x), batch, dev, budget, reps=run.sizes.reps)
        gflops = counted_gflops(lambda: model(x[:1]))
    out.update(value=round(rate, 1), peak_memory_gib=peak_memory_gib(dev), gflops_per_image=round(gflops, 2),
               tflops_per_s=round(gflops * rate / 1e3, 2))


def part_distributed(run: Run, budget: Budget, out: dict[str, Any]) -> None:
    """torchrun with one process, as train_ar launches its ranks (`pipeline/torchrun.py`)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           str(Path(__file__).resolve()), "--distributed-worker", "--device", run.device.type,
           *(["--quick"] if run.quick else [])]
    out.update(figure="torchrun --nproc-per-node 1: start, init, 2 DDP steps, teardown (s)",
               command=" ".join(cmd[:8]) + " …")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(budget.left() - 2, 1), cwd=REPO, env=env)
    seconds = time.perf_counter() - t0
    worker = [json.loads(line[len(WORKER_MARK):]) for line in proc.stdout.splitlines() if line.startswith(WORKER_MARK)]
    if proc.returncode != 0 or not worker:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
        raise RuntimeError(f"torchrun exited with {proc.returncode}: {tail[-1200:]}")
    out.update(worker[0], value=round(seconds, 2))


def distributed_worker(device_type: str, quick: bool) -> None:
    """One torchrun rank: join the group (NCCL on a GPU, gloo on a CPU), two DDP steps of a small transformer,
    leave the group; one JSON line on stdout."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    sizes = QUICK if quick else FULL
    cuda = device_type == "cuda"
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if cuda else "gloo"
    t0 = time.perf_counter()
    dist.init_process_group(backend)
    ones = torch.ones(1, device=device)
    dist.all_reduce(ones)  # NCCL creates its communicator on the first collective
    synchronize(device)
    init_s = time.perf_counter() - t0

    cfg = transformer_config(sizes.tokenizer, sizes.ddp_depth)
    model = seeded_transformer(cfg, device)
    net = DistributedDataParallel(model, device_ids=[local_rank] if cuda else None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    batch = 8
    g = torch.Generator(device).manual_seed(0)
    tokens = torch.randint(cfg.vocab_size, (batch, cfg.L), device=device, generator=g)
    labels = torch.randint(cfg.num_classes, (batch,), device=device, generator=g)
    inputs = torch.randn(batch, cfg.L - cfg.first_l, cfg.cvae, device=device, generator=g)  # stands in for f̂
    losses = []
    t1 = time.perf_counter()
    for _ in range(2):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            logits = net(labels, inputs)
        value = F.cross_entropy(logits.float().transpose(1, 2), tokens)
        opt.zero_grad(set_to_none=True)
        value.backward()  # DDP all-reduces the gradients here
        opt.step()
        losses.append(float(value))
    synchronize(device)
    steps_s = time.perf_counter() - t1
    world = dist.get_world_size()
    dist.destroy_process_group()
    print(WORKER_MARK + json.dumps({
        "backend": backend, "world_size": world, "all_reduce_sum": float(ones), "init_seconds": round(init_s, 2),
        "two_steps_seconds": round(steps_s, 3), "losses": [round(v, 4) for v in losses],
        "finite": all(math.isfinite(v) for v in losses), "destroyed": not dist.is_initialized(),
        "depth": cfg.depth, "batch": batch, "dtype": "bfloat16 autocast" if cuda else "float32"}), flush=True)


PART_FUNCTIONS: dict[str, Callable[[Run, Budget, dict[str, Any]], None]] = {
    "decomposition": part_decomposition, "tokenizer": part_tokenizer, "transformer": part_transformer,
    "sampling": part_sampling, "evaluation": part_evaluation, "distributed": part_distributed,
}


# ---- the run ----------------------------------------------------------------------------------------------


def new_record(name: str, device: torch.device) -> dict[str, Any]:
    return {"part": name, "figure": name, "value": None, "unit": UNITS[name], "baseline": GOALS.get(name),
            "ratio": None, "device": device_name(device), "dtype": None, "batch": None, "ok": False, "error": None}


def run_part(record: dict[str, Any], run: Run) -> None:
    """One part, time-boxed, into its `record`: what it measured, ok or with the error that stopped it."""
    name = record["part"]
    budget = Budget(BUDGET_S[name])
    try:
        with hard_deadline(budget.seconds + GRACE_S) as fired:
            PART_FUNCTIONS[name](run, budget, record)  # fills the record as it measures: a timeout keeps the rest
        record["ok"] = True
    except Exception as err:  # PartTimeout, OOM, a bug on a path never run before: reported, the next part runs
        error = f"{type(err).__name__}: {err}"
        if fired[0] and not isinstance(err, PartTimeout):
            error = f"PartTimeout: ran past its budget (+{GRACE_S} s), surfacing as {error}"
        record.update(error=error, traceback=traceback.format_exc(limit=-4))
    finally:
        free_memory(run.device)
    if record["value"] is not None and record["baseline"]:
        record["ratio"] = round(record["value"] / record["baseline"], 3)
    record["seconds"] = round(time.perf_counter() - budget.start, 1)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def commit() -> str | None:
    """The checkout's commit, or NEXTDETAIL_COMMIT where the tree was copied without git (the lent machine)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return os.environ.get("NEXTDETAIL_COMMIT")


def run_meta(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "device": device_name(device),
        "commit": commit(), "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "quick": args.quick, "argv": sys.argv[1:], "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "matmul_tf32": torch.backends.cuda.matmul.allow_tf32, "cudnn_tf32": torch.backends.cudnn.allow_tf32,
    }


def write_out(path: Path, meta: dict[str, Any], records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"meta": meta, "parts": records}, indent=1, default=str) + "\n")
    tmp.replace(path)


def fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.3g}"
    return str(v)


def notes(r: dict[str, Any]) -> str:
    """The part's fields beside its headline number, for the table."""
    if not r["ok"]:
        return (r["error"] or "")[:110]
    p = r["part"]
    if p == "decomposition":
        a = r["agreement"]
        return (f"peak {fmt(r['peak_memory_gib'])} GiB; CPU agreement rel-RMS {a['relative_rms']} (bound {a['bound']}); "
                f"{r['same_work_ratio']}× one core ({r['cpu_solver']} CPU)")
    if p == "tokenizer":
        return (f"bf16 {fmt(r['images_per_s_bf16'])} img/s ({r['bf16_speedup']}×), tokens agree "
                f"{r['token_agreement_bf16_vs_fp32_pct']} %")
    if p == "transformer":
        big = r["big_model"]
        return (f"{r['tokens_per_s']:,} tok/s, peak {fmt(r['peak_memory_gib'])} GiB; "
                f"d{big['depth']}@{big['batch']} peak {fmt(big.get('peak_memory_gib'))} GiB")
    if p == "sampling":
        cart = r["cart_order3"]
        return f"CART order 3: {fmt(cart.get('images_per_s'))} img/s ({cart.get('maps', '?')} maps)"
    if p == "evaluation":
        return f"{r['network']}; random-conv {fmt(r['randconv_images_per_s'])} img/s"
    if p == "distributed":
        return f"{r['backend']}: init {r['init_seconds']} s, 2 steps {r['two_steps_seconds']} s, destroyed {r['destroyed']}"
    return ""


def table(meta: dict[str, Any], records: list[dict[str, Any]], seconds: float) -> str:
    head = f"{'part':<14}{'value':>10} {'unit':<6}{'goal':>7}{'ratio':>7}  {'dtype':<18}{'batch':>6}{'s':>5}  notes"
    lines = [f"nextdetail GPU check — {meta['device']}, torch {meta['torch']}, commit {(meta['commit'] or '?')[:12]}, "
             f"{meta['date']}", head, "-" * len(head)]
    for r in records:
        lines.append(f"{r['part']:<14}{fmt(r['value']):>10} {r['unit']:<6}{fmt(r['baseline']):>7}{fmt(r['ratio']):>7}  "
                     f"{str(r['dtype'] or '—')[:17]:<18}{fmt(r['batch']):>6}{r['seconds']:>5.0f}  "
                     f"{'' if r['ok'] else 'FAILED '}{notes(r)}")
    lines.append(f"total {seconds:.0f} s (goal: ≤ 480 s on the GPU); each part's figure, fields and errors in the JSON")
    return "\n".join(lines)


def parse_parts(text: str) -> list[str]:
    """'1,3' or 'tokenizer,sampling' (names or 1-based numbers) → part names in run order."""
    chosen = set()
    for item in filter(None, (t.strip() for t in text.split(","))):
        name = PARTS[int(item) - 1] if item.isdigit() and 1 <= int(item) <= len(PARTS) else item
        if name not in PARTS:
            raise SystemExit(f"--parts: unknown part {item!r}; use names or numbers of {', '.join(PARTS)}")
        chosen.add(name)
    return [p for p in PARTS if p in chosen]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: every part in seconds (tests, CPU)")
    parser.add_argument("--parts", default=",".join(PARTS), help="a subset: names or numbers 1–6, comma-separated")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "gpu.json")
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak for MFU on another GPU")
    parser.add_argument("--distributed-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.distributed_worker:
        distributed_worker(args.device, args.quick)
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device; `--device cpu --quick` runs the check on a CPU")
    if device.type == "cuda":
        torch.cuda.init()  # the context's start-up is counted here, not in the first part
    parts = parse_parts(args.parts)
    sizes = QUICK if args.quick else FULL
    photos, source = real_photos(sizes.side)
    run = Run(device, sizes, args.quick, args.peak_tflops, photos, source)
    if "decomposition" in parts:
        from nextdetail.models import mumford_shah

        # The compiled CPU solver's first build takes about a minute: it runs while the GPU solver is timed.
        run.cpu_build = threading.Thread(target=mumford_shah.cpu_kernels, name="cpu-solver-build", daemon=True)
        run.cpu_build.start()
    meta = run_meta(device, args)
    records: list[dict[str, Any]] = []

    def finish(cut_off: dict[str, Any] | None = None) -> None:
        """The run's end: the JSON with the total, the table; `cut_off` is the part the watchdog stopped."""
        meta["total_seconds"] = round(time.monotonic() - STARTED, 1)
        done = records + ([cut_off] if cut_off else [])
        write_out(args.out, meta, done)
        print(table(meta, done, meta["total_seconds"]), file=sys.stderr)
        print(f"JSON: {args.out}", file=sys.stderr, flush=True)

    def give_up() -> None:
        """Last resort against a hang in C or CUDA code, where no Python signal handler runs: report the running
        part as cut off, write everything, end the process."""
        record, started = running[0]
        current = {**record, "ok": False, "error": f"Watchdog: the check ran past {TOTAL_S} s; this part was cut off",
                   "seconds": round(time.perf_counter() - started, 1)}
        print(json.dumps(current, default=str), flush=True)
        finish(current)
        os._exit(3)

    running: list[tuple[dict[str, Any], float]] = []  # the part under way and when it started
    watchdog = threading.Timer(max(TOTAL_S - (time.monotonic() - STARTED), 1), give_up)
    watchdog.daemon = True
    watchdog.start()
    for name in parts:
        record = new_record(name, device)
        running[:] = [(record, time.perf_counter())]
        run_part(record, run)
        records.append(record)
        running.clear()
        print(json.dumps(record, default=str), flush=True)
        write_out(args.out, meta, records)
    watchdog.cancel()
    finish()
    return 0 if all(r["ok"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
