"""Benchmark: CART's Figure 7 at small scale — reconstruction error of three tokenizers against the
number of token maps (quantization depth), on the embedded dataset, equal training steps.

- vanilla: single-scale residual VQ, every map at the full latent size (8×8 here);
- multi-scale (VAR): maps (1, 2, 4, 8) then further full-size residual maps, all quantizing f_I;
- base-detail (CART, order 3): the same sizes — base maps (1, 2, 4, 8) of f_{B_3}, then k full-size
  maps for each detail factor D_3, D_2, D_1 ((M − B)/n = k): the same token maps and token count as
  multi-scale, M = 4 + 3·k; the two differ only in what each map quantizes.
Token counts: multi-scale and base-detail are equal by construction; vanilla uses the nearest whole
number of 8×8 maps at or above them (a small advantage to it, reported). Each trains the same tiny
architecture for the same steps from the same seed; the error is measured on the held-out `val` split.
Prints one JSON line and writes out/tokenizer_recon/figure7.png.

    python benchmarks/tokenizer_recon.py [--steps 200] [--depths 1 2 3] [--seeds 0 1 2] [--torch-threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from nextdetail.flows.runtime import configure_environment

OUT = Path(__file__).resolve().parent / "out" / "tokenizer_recon"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--depths", type=int, nargs="+", default=[1, 2, 3], help="full-size maps per detail factor (k)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds; the table reports the mean")
    ap.add_argument("--torch-threads", type=int, default=None, help="torch threads per run (default: all cores)")
    args = ap.parse_args()
    configure_environment(OUT / "work")

    import torch

    from nextdetail.conf import load_config
    from nextdetail.flows.pipeline import run_pipeline
    from nextdetail.flows.train_tokenizer import train_data
    from nextdetail.models.tokenizer import BaseDetailVQVAE, TokenizerSpec
    from nextdetail.storage.factor_loader import FactorBatches
    from nextdetail.storage.fs import Store
    from nextdetail.tasks.train_tokenizer import train

    base = ["storage.root=" + str(OUT / "data"), f"tokenizer.batch_size={args.batch_size}",
            f"tokenizer.steps={args.steps}", f"tokenizer.checkpoint_every={args.steps}", "tokenizer.log_every=1000"]
    if args.torch_threads:
        base.append(f"tokenizer.torch_threads={args.torch_threads}")
    results = run_pipeline(load_config("tiny", overrides=base), until="decompose", progress=False)
    shards, dec = results["shard"], results["decompose"]
    rows = []
    for k in args.depths:
        tokens = 1 + 4 + 16 + 64 * (1 + 3 * k)
        vanilla_maps = math.ceil(tokens / 64)
        variants = {
            "vanilla": ([8] * vanilla_maps, 0, 1),
            "multi_scale": ([1, 2, 4, 8] + [8] * (3 * k), 0, 1),
            "base_detail": ([1, 2, 4, 8], 3, k),
        }
        for (name, (patch_nums, order, depth)), seed in ((v, s) for v in variants.items() for s in args.seeds):
            cfg = load_config("tiny", overrides=[*base, f"tokenizer.patch_nums={patch_nums}", f"tokenizer.seed={seed}",
                                                 f"tokenizer.order={order}", f"tokenizer.detail_depth={depth}"])
            spec: TokenizerSpec = TokenizerSpec.from_config(cfg)
            store = Store(str(OUT / "runs" / f"{name}-k{k}-seed{seed}-steps{args.steps}"))
            t0 = time.time()
            summary = train(store, train_data(cfg, shards, dec), cfg.tokenizer, spec, log=lambda _: None)
            model = BaseDetailVQVAE(spec)
            model.load_state_dict(torch.load(store.path("tokenizer.pt"), weights_only=True)["model"])
            model.eval()
            val = FactorBatches(train_data(cfg, shards, dec, split="val"), spec.order, 16, seed=0)
            se, n = 0.0, 0
            for step in range(val.steps_per_epoch):
                x, b = val.batch(step)
                rec = model.indices_to_img(model.img_to_indices(x, b))
                se += float(((rec - x) / 2).square().sum())  # in [0, 1] units
                n += x.numel()
            mse = se / n
            rows.append({"variant": name, "k": k, "seed": seed, "token_maps": len(model.schedule),
                         "tokens": sum(m.side**2 for m in model.schedule), "val_mse": round(mse, 6),
                         "val_psnr_db": round(10 * math.log10(1 / mse), 2), "train_steps": args.steps,
                         "seconds": round(time.time() - t0, 1), "final_train_rec": summary["final_rec"]})
            print(json.dumps(rows[-1]), flush=True)
    table = _mean_table(rows)
    _plot(table, OUT / "figure7.png")
    by = {(r["variant"], r["k"]): r for r in table}
    print(json.dumps({
        "benchmark": "tokenizer_recon", "figure": "val_mse_by_depth", "dataset": "embedded (tiny preset, 32 px)",
        "steps": args.steps, "seeds": args.seeds, "table": table, "plot": str(OUT / "figure7.png"),
        "base_detail_vs_multi_scale_mse_ratio": {k: round(by[("base_detail", k)]["val_mse"] /
                                                          by[("multi_scale", k)]["val_mse"], 3) for k in args.depths},
        "baseline": "multi_scale (VAR) at the same token maps and tokens",
    }))


def _mean_table(rows: list[dict]) -> list[dict]:
    """One row per (variant, k): the mean val MSE over seeds, with its spread."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["variant"], r["k"]), []).append(r)
    out = []
    for (variant, k), rs in groups.items():
        mses = [r["val_mse"] for r in rs]
        mean = sum(mses) / len(mses)
        out.append({"variant": variant, "k": k, "token_maps": rs[0]["token_maps"], "tokens": rs[0]["tokens"],
                    "val_mse": round(mean, 6), "val_mse_min": min(mses), "val_mse_max": max(mses),
                    "val_psnr_db": round(10 * math.log10(1 / mean), 2), "seeds": len(rs)})
    return out


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    for name, color in (("vanilla", "tab:blue"), ("multi_scale", "tab:red"), ("base_detail", "gold")):
        pts = [(r["tokens"], r["val_mse"]) for r in rows if r["variant"] == name]
        ax.plot(*zip(*pts, strict=True), "o-", color=color, label=name)
    ax.set_xlabel("tokens per image")
    ax.set_ylabel("val reconstruction MSE ([0, 1] scale)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
