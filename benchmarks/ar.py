"""Benchmark: the next-detail transformer's training throughput and sampling speed, CART (decomposition
order n) against the VAR-equivalent model of equal depth and width (order 0: the same base scales,
no detail maps), measured in one run on the same device.

Models are built from a preset's settings (tokenizer schedule + `ar.*`) with random weights; speed
does not depend on what was learned. Training steps include everything the stage does per step:
teacher-forcing inputs from the tokenizer's quantizer, forward, cross-entropy, backward, clipping,
AdamW (bf16 autocast on CUDA). Sampling includes CFG (both halves in one call per map), top-k/top-p
and decoding by the tokenizer. On CUDA, model FLOPs utilisation (MFU) = model FLOPs/s ÷ the GPU's
dense bf16 peak (H100 SXM 989 TFLOP/s, H200 the same; `--peak-tflops` to change).

    python benchmarks/ar.py [--preset tiny] [--device cpu|cuda] [--batch 32] [--seconds 10]

Prints one JSON line: per model tokens/s, images/s (training and sampling), forward passes per image,
parameters, and `ratio` = CART ÷ VAR for each figure.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def flops_per_token(model: torch.nn.Module, sides: tuple[int, ...]) -> float:
    """Training FLOPs per token: 6 · (matmul weights per token) + attention (QKᵀ and AV over each token's
    visible context, ×3 for backward)."""
    cfg = model.cfg
    per_token = sum(p.numel() for n, p in model.named_parameters()
                    if p.ndim == 2 and ("mat_qkv" in n or "proj" in n or "fc" in n or n == "head.weight"))
    L = sum(s * s for s in sides)
    context = sum(s * s * sum(t * t for t in sides[: k + 1]) for k, s in enumerate(sides)) / L  # mean visible keys
    return 6 * per_token + 3 * 2 * 2 * cfg.depth * cfg.C * context


def bench_model(order: int, args: argparse.Namespace, cfg) -> dict:
    from nextdetail.models.sampler import CARTSampler
    from nextdetail.models.tokenizer import BaseDetailVQVAE, TokenizerSpec
    from nextdetail.models.transformer import TeacherInputs
    from nextdetail.stages.train_ar.tasks import ARTrainer, transformer_config
    from nextdetail.storage.tokens import token_layout

    device = torch.device(args.device)
    spec = TokenizerSpec.from_config(cfg.model_copy(update={"tokenizer": cfg.tokenizer.model_copy(update={"order": order})}))
    torch.manual_seed(0)
    tokenizer = BaseDetailVQVAE(spec).to(device).eval()
    layout = token_layout(tokenizer.schedule, order, spec.vocab_size, ["none"])
    ar = cfg.ar.model_copy(update={"batch_size": args.batch, "steps": 10**6, "warmup_steps": 0})
    tcfg = transformer_config(ar, layout, 1000 if args.preset != "tiny" else 12, spec.z_channels)
    trainer = ARTrainer(ar, tcfg, TeacherInputs(tokenizer, tcfg.sides), device)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(tcfg.vocab_size, (args.batch, tcfg.L), generator=g)
    labels = torch.randint(tcfg.num_classes, (args.batch,), generator=g)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for s in range(3):  # warm-up
        trainer.step(s, tokens, labels)
    sync()
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args.seconds or steps < 3:
        trainer.step(steps, tokens, labels)
        steps += 1
    sync()
    train_s = (time.perf_counter() - t0) / steps
    out = {"order": order, "token_maps": len(tcfg.sides), "tokens_per_image": tcfg.L,
           "parameters": sum(p.numel() for p in trainer.model.parameters()),
           "train_tokens_per_s": round(args.batch * tcfg.L / train_s),
           "train_images_per_s": round(args.batch / train_s, 2)}
    if device.type == "cuda":
        achieved = flops_per_token(trainer.model, tcfg.sides) * args.batch * tcfg.L / train_s
        out["model_tflops_per_s"] = round(achieved / 1e12, 2)
        out["mfu"] = round(achieved / (args.peak_tflops * 1e12), 4)
    sampler = CARTSampler(trainer.model.eval(), tokenizer)
    labels = torch.arange(args.sample_batch, device=device) % tcfg.num_classes
    sampler.sample(labels, 1.5, 0, 0.0, torch.Generator(device).manual_seed(0))  # warm-up
    sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args.seconds or n == 0:
        sampler.sample(labels, 1.5, 0, 0.0, torch.Generator(device).manual_seed(n))
        n += 1
    sync()
    out["sample_images_per_s"] = round(n * args.sample_batch / (time.perf_counter() - t0), 2)
    out["forward_passes_per_image"] = sampler.forward_passes
    out["train_flops_per_token"] = round(flops_per_token(trainer.model, tcfg.sides))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=32, help="training batch")
    ap.add_argument("--sample-batch", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=10.0, help="least time per measurement")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (CPU); default: all cores")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU, for MFU")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from nextdetail.conf import load_config

    cfg = load_config(args.preset)
    order = cfg.tokenizer.order if cfg.tokenizer.order is not None else cfg.decompose.order
    cart, var = bench_model(order, args, cfg), bench_model(0, args, cfg)
    ratio = {k: round(cart[k] / var[k], 3) for k in ("train_tokens_per_s", "train_images_per_s",
                                                    "sample_images_per_s", "forward_passes_per_image")}
    print(json.dumps({"benchmark": "ar", "preset": args.preset, "device": args.device,
                      "torch_threads": torch.get_num_threads(), "batch": args.batch,
                      "figure": "CART vs VAR-equivalent (order 0), equal depth and width",
                      "cart": cart, "baseline_var": var, "ratio": ratio}))


if __name__ == "__main__":
    main()
