"""Benchmark: CART's Figure 7 at small scale, done so that its causes can be told apart — reconstruction error of
multi-scale (VAR) and base-detail (CART) tokenizers on the embedded dataset's real photographs.

What varies (each a flag), and why (issue 27):
- the residual reading of base-detail (`tokenizer.residual`): `independent` (Algorithm 1 literally: one chain
  per source), `shared` (each chain starts from what the ones before left), `independent+global` (one more
  full-resolution map on f_I − f̂);
- both axes: the error after each of the first d maps (*quantization depth*, the paper's axis) and against the
  tokens those d maps hold (*equal tokens*) — one trained tokenizer gives both curves (partial sums of Algorithm 2);
- the unquantized decode (the encoder's f_I straight into the decoder) beside every quantized error: what the
  autoencoder alone loses, so a ranking set by autoencoder training is not read as one set by quantization;
- the resolution (`--resolutions 32 64`: 64 px crops of the same photographs) and α as given or scaled to the
  resolution (`--alpha-reference none 256`: `decompose.alpha_reference_px`), with the share of image variance the
  details hold (1 − var(B_n)/var(I) measured on val) for each: tiny results transfer only if that regime does;
- training seeds (`--seeds`): the spread is reported beside every mean, and every base-detail tokenizer over
  multi-scale's trained with the same seed (seed-matched).
Multi-scale and base-detail have the same map sizes (base scales (1, 2, 4, …, latent), then `--depth` full-size
maps per detail factor, and the global map; multi-scale's extra maps quantize f_I again, as many as the longest
base-detail schedule): at every depth both hold the same tokens, so the two axes differ only in spacing, and
each base-detail tokenizer is compared with multi-scale's curve at its own token count. Everything trains the
tiny architecture for `--steps` steps at batch `--batch-size`.

    python benchmarks/tokenizer_recon.py [--steps 200] [--seeds 0 1] [--resolutions 32 64]
        [--readings independent shared independent+global] [--alpha-reference none 256] [--torch-threads 1]
    python benchmarks/tokenizer_recon.py --merge A/results.json B/results.json   # one summary of both

Prints one JSON line per trained tokenizer, then the summary (figure: base-detail / multi-scale val MSE at equal
tokens per reading, resolution and α; baseline: multi-scale = 1) and writes out/tokenizer_recon/figure7.png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import time
from pathlib import Path

from nextdetail.pipeline.runtime import configure_environment

OUT = Path(__file__).resolve().parent / "out" / "tokenizer_recon"
DOWNSAMPLE = 4  # the tiny preset's ch_mult (1, 2, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--depth", type=int, default=1, help="full-size maps per detail factor ((M − B)/n)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--resolutions", type=int, nargs="+", default=[32])
    ap.add_argument("--readings", nargs="+", default=["independent", "shared", "independent+global"])
    ap.add_argument("--alpha-reference", nargs="+", default=["none", "256"],
                    help="decompose.alpha_reference_px values (none: α as given)")
    ap.add_argument("--per-class", type=int, default=200, help="training images per class (val: 20)")
    ap.add_argument("--torch-threads", type=int, default=None, help="torch threads per run (default: all cores)")
    ap.add_argument("--merge", nargs="+", default=[], metavar="JSON",
                    help="summarize these results.json files' rows together; train nothing")
    args = ap.parse_args()
    if args.merge:
        _merge([Path(p) for p in args.merge], args)
        return
    configure_environment(OUT / "work")
    rows, regimes = [], []
    t_start = time.time()
    for res in args.resolutions:
        for ref in args.alpha_reference:
            data = _decomposed(res, None if ref == "none" else int(ref), args)
            regimes.append({"resolution": res, "alpha_reference_px": data["alpha_reference_px"],
                            "alpha": data["alpha"], "detail_variance_share": data["detail_share"]})
            print(json.dumps({"regime": regimes[-1]}), flush=True)
            variants = [("base_detail", r) for r in args.readings]
            if ref == args.alpha_reference[0]:
                variants.insert(0, ("multi_scale", "-"))  # order 0 reads no factors: once per resolution
            for (variant, reading), seed in ((v, s) for v in variants for s in args.seeds):
                rows.append(_train_and_measure(data, variant, reading, seed, args))
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "curve"}), flush=True)
    _report(rows, regimes, args, time.time() - t_start)


def _merge(paths: list[Path], args: argparse.Namespace) -> None:
    """One summary and one figure from several runs' results (e.g. seeds trained by separate invocations); a row
    trained twice (same variant, reading, resolution, α, seed) is kept once."""
    rows, regimes, seen = [], [], set()
    for path in paths:
        result = json.loads(path.read_text())
        for r in result["rows"]:
            key = (r["variant"], r["reading"], r["resolution"], r["alpha_reference_px"], r["seed"])
            if key not in seen:
                seen.add(key)
                rows.append(r)
        regimes += [g for g in result["regimes"] if g not in regimes]
    args.seeds = sorted({r["seed"] for r in rows})
    args.steps = rows[0]["train_steps"]
    _report(rows, regimes, args, sum(r["seconds"] for r in rows))


def _report(rows: list[dict], regimes: list[dict], args: argparse.Namespace, seconds: float) -> None:
    """The summary printed as JSON, the figure, and results.json (rows with their curves: `--merge` reads them)."""
    summary = _summary(rows, regimes, args, seconds)
    _plot(rows, OUT / "figure7.png")
    (OUT / "results.json").write_text(json.dumps({"rows": rows, **summary}, indent=1))
    print(json.dumps(summary))


def _overrides(res: int, ref: int | None, args: argparse.Namespace) -> list[str]:
    latent = res // DOWNSAMPLE
    scales = [2**i for i in range(int(math.log2(latent)) + 1)]
    out = [f"storage.root={OUT / 'data'}", f"data.embedded.image_size={res * 3 // 2}", f"shard.resolution={res}",
           f"data.embedded.per_class={args.per_class}", f"tokenizer.patch_nums={scales}",
           f"tokenizer.batch_size={args.batch_size}", f"tokenizer.steps={args.steps}",
           f"tokenizer.checkpoint_every={args.steps}", "tokenizer.log_every=1000"]
    if ref is not None:
        out.append(f"decompose.alpha_reference_px={ref}")
    if args.torch_threads:
        out.append(f"tokenizer.torch_threads={args.torch_threads}")
    return out


def _decomposed(res: int, ref: int | None, args: argparse.Namespace) -> dict:
    """Shards and factors at this resolution and α (cached under out/tokenizer_recon/data), and the share of
    image variance in I − B_n on val."""
    from nextdetail.conf import load_config
    from nextdetail.pipeline.run import run_pipeline
    from nextdetail.stages.train_tokenizer.flow import train_data
    from nextdetail.storage.factor_loader import FactorBatches

    base = _overrides(res, ref, args)
    cfg = load_config("tiny", overrides=base)
    results = run_pipeline(cfg, until="decompose", progress=False)
    shards, dec = results["shard"], results["decompose"]
    val = FactorBatches(train_data(cfg, shards, dec, split="val"), cfg.decompose.order, 64, seed=0)
    total = detail = 0.0
    for step in range(val.steps_per_epoch):
        x, b = val.batch(step)  # x (B, 3, H, W) in [-1, 1]; b (order, B, 3, H, W)
        x01, bn = (x + 1) / 2, (b[-1] + 1) / 2
        total += float(x01.var(dim=(2, 3)).sum())
        detail += float((x01 - bn).var(dim=(2, 3)).sum())
    return {"res": res, "alpha_reference_px": ref, "alpha": cfg.decompose.alpha_at(res), "overrides": base,
            "shards": shards, "decompose": dec, "detail_share": round(detail / total, 4)}


def _train_and_measure(data: dict, variant: str, reading: str, seed: int, args: argparse.Namespace) -> dict:
    import torch

    from nextdetail.conf import load_config
    from nextdetail.models.tokenizer import BaseDetailVQVAE, TokenizerSpec
    from nextdetail.stages.train_tokenizer.flow import train_data
    from nextdetail.stages.train_tokenizer.tasks import train
    from nextdetail.storage.factor_loader import FactorBatches
    from nextdetail.storage.fs import Store

    latent = data["res"] // DOWNSAMPLE
    scales = [2**i for i in range(int(math.log2(latent)) + 1)]
    if variant == "multi_scale":  # as many maps as the longest base-detail schedule: its curve covers every count
        full = 3 * args.depth + ("independent+global" in args.readings)
        extra = ["tokenizer.order=0", f"tokenizer.patch_nums={scales + [latent] * full}"]
    else:
        extra = ["tokenizer.order=3", f"tokenizer.detail_depth={args.depth}", f"tokenizer.residual={reading}"]
    cfg = load_config("tiny", overrides=[*data["overrides"], *extra, f"tokenizer.seed={seed}"])
    spec = TokenizerSpec.from_config(cfg)
    alpha = "any" if variant == "multi_scale" else data["alpha_reference_px"]  # order 0 reads no factors
    name = f"{variant}-{reading}-r{data['res']}-a{alpha}-k{args.depth}-s{seed}-steps{args.steps}"
    store = Store(str(OUT / "runs" / name.replace("+", "_")))
    t0 = time.time()
    summary = train(store, train_data(cfg, data["shards"], data["decompose"]), cfg.tokenizer, spec, log=lambda _: None)
    model = BaseDetailVQVAE(spec)
    model.load_state_dict(torch.load(store.path("tokenizer.pt"), weights_only=True)["model"])
    model.eval()
    val = FactorBatches(train_data(cfg, data["shards"], data["decompose"], split="val"), spec.order, 32, seed=0)
    sides = [m.side for m in model.schedule]
    se = [0.0] * len(sides)
    se_unquantized, n = 0.0, 0
    with torch.no_grad():
        for step in range(val.steps_per_epoch):
            x, b = val.batch(step)
            partial = model.quantize.indices_to_f(model.img_to_indices(x, b), spec.latent_side, cumulative=True)
            for d, f_hat in enumerate(partial):
                se[d] += float(((model.fhat_to_img(f_hat).clamp(-1, 1) - x) / 2).square().sum())
            f_image = torch.stack(model.sources(x, b)).sum(0)
            se_unquantized += float(((model.fhat_to_img(f_image).clamp(-1, 1) - x) / 2).square().sum())
            n += x.numel()
    tokens = [sum(s * s for s in sides[: d + 1]) for d in range(len(sides))]
    curve = [{"depth": d + 1, "tokens": tokens[d], "val_mse": round(se[d] / n, 6)} for d in range(len(sides))]
    mse, unq = se[-1] / n, se_unquantized / n
    return {"variant": variant, "reading": reading, "resolution": data["res"],
            "alpha_reference_px": data["alpha_reference_px"], "seed": seed, "token_maps": len(sides),
            "tokens": tokens[-1], "val_mse": round(mse, 6), "unquantized_mse": round(unq, 6),
            "quantization_share": round((mse - unq) / mse, 3), "train_steps": args.steps,
            "seconds": round(time.time() - t0, 1), "final_train_rec": summary["final_rec"], "curve": curve}


def _summary(rows: list[dict], regimes: list[dict], args: argparse.Namespace, seconds: float) -> dict:
    """Means over seeds (with min/max) and base-detail / multi-scale at equal tokens for every reading: the ratio of
    means, base-detail's seed range over multi-scale's mean, and the ratio seed by seed."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["variant"], r["reading"], r["resolution"], r["alpha_reference_px"]), []).append(r)
    table = []
    for (variant, reading, res, ref), rs in groups.items():
        mses, unq = [r["val_mse"] for r in rs], [r["unquantized_mse"] for r in rs]
        table.append({"variant": variant, "reading": reading, "resolution": res, "alpha_reference_px": ref,
                      "tokens": rs[0]["tokens"], "val_mse": round(statistics.mean(mses), 6),
                      "val_mse_min": min(mses), "val_mse_max": max(mses),
                      "unquantized_mse": round(statistics.mean(unq), 6), "seeds": len(rs)})
    ratios = {}
    for t in table:
        if t["variant"] != "base_detail":
            continue
        ms = next((m for m in table if m["variant"] == "multi_scale" and m["resolution"] == t["resolution"]), None)
        if ms is None:
            continue
        ms_rows = [r for r in rows if r["variant"] == "multi_scale" and r["resolution"] == t["resolution"]]
        at_equal_tokens = _mse_at_tokens(ms_rows, t["tokens"])
        # Seed-matched: a base-detail tokenizer over multi-scale's trained with the same seed (same init draws and
        # batches), so multi-scale's own seed noise is not read as base-detail's.
        per_seed = {}
        for r in groups[("base_detail", t["reading"], t["resolution"], t["alpha_reference_px"])]:
            same = [m for m in ms_rows if m["seed"] == r["seed"]]
            if same:
                per_seed[str(r["seed"])] = round(r["val_mse"] / _mse_at_tokens(same, r["tokens"]), 3)
        ratios[f"{t['reading']} r{t['resolution']} alpha_ref {t['alpha_reference_px']}"] = {
            "base_detail_over_multi_scale": round(t["val_mse"] / at_equal_tokens, 3),
            "seed_range": [round(t["val_mse_min"] / at_equal_tokens, 3), round(t["val_mse_max"] / at_equal_tokens, 3)],
            "per_seed": per_seed, "tokens": t["tokens"]}
    return {"benchmark": "tokenizer_recon", "figure": "base_detail_over_multi_scale", "baseline": "multi_scale = 1",
            "ratio": ratios, "steps": args.steps, "seeds": args.seeds, "depth": args.depth, "regimes": regimes,
            "table": table, "plot": str(OUT / "figure7.png"), "seconds": round(seconds, 1)}


def _mse_at_tokens(rows: list[dict], tokens: int) -> float:
    """Multi-scale's mean val MSE at `tokens` tokens, read off its depth curves (linear between maps)."""
    values = []
    for r in rows:
        pts = [(c["tokens"], c["val_mse"]) for c in r["curve"]]
        if tokens >= pts[-1][0]:
            values.append(pts[-1][1])
            continue
        for (t0, m0), (t1, m1) in itertools.pairwise(pts):
            if t0 <= tokens <= t1:
                values.append(m0 + (m1 - m0) * (tokens - t0) / (t1 - t0))
                break
    return statistics.mean(values)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["resolution"], r["alpha_reference_px"] or 0) for r in rows if r["variant"] == "base_detail"})
    fig, axes = plt.subplots(2, max(len(panels), 1), figsize=(4.5 * max(len(panels), 1), 7), dpi=100, squeeze=False)
    colors = {"multi_scale": "tab:red", "independent": "gold", "shared": "tab:green", "independent+global": "tab:blue"}
    for j, (res, ref) in enumerate(panels):
        for axis, ax in zip(("depth", "tokens"), axes[:, j], strict=True):
            for r in rows:
                if r["resolution"] != res or (r["variant"] == "base_detail" and (r["alpha_reference_px"] or 0) != ref):
                    continue
                label = r["variant"] if r["variant"] == "multi_scale" else r["reading"]
                ax.plot([c[axis] for c in r["curve"]], [c["val_mse"] for c in r["curve"]], "o-", ms=3, lw=1,
                        color=colors[label], alpha=0.8, label=f"{label} s{r['seed']}")
                ax.axhline(r["unquantized_mse"], color=colors[label], lw=0.5, ls=":")
            ax.set_yscale("log")
            ax.set_xlabel("quantization depth (maps)" if axis == "depth" else "tokens per image")
            ax.set_ylabel("val MSE ([0, 1]); dotted: unquantized")
            ax.set_title(f"{res} px, α ref {ref or 'none'}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
