"""Benchmark: CART's Table 4 at small scale — does the decomposition order help image quality?

For each decomposition order n (0 = VAR: the multi-scale base only; n ≥ 1: the base B_n plus n detail
factors D_n … D_1), the whole pipeline runs from the same shards and the same order-4 decomposition
(order n uses B_1 … B_n of it): tokenizer, token cache, transformer, evaluation. Everything else is
equal — the tokenizer's and the transformer's architecture (depth, width), steps, batch sizes, seeds —
so higher orders see more token maps with the same model. The score is the evaluation stage's
(`eval.*` of the preset: on `tiny` the offline random-feature extractor, whose numbers rank models but
are not comparable with published FID).

    python benchmarks/order_ablation.py [--preset tiny] [--orders 0 1 2 3 4] [--root DIR] [-o key=value …]

Prints one JSON line: per order FID (mean over `--eval-seeds` sampling seeds, each seed's value and their
spread — differences smaller than the spread are noise), KID, IS, precision, recall (first seed), the
tokenizer's rFID and PSNR, token maps, tokens per image and seconds; `baseline` = order 0's FID,
`ratio` = each order's FID ÷ it. Writes `order_ablation.png` (metrics vs. order) and `order_ablation.json` under the root. Stages are
cached: a re-run with more orders runs only the new ones.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def run_order(order: int, args: argparse.Namespace) -> dict:
    """One order: the pipeline once, then the evaluation again per extra sampling seed (training cached)."""
    import numpy as np

    from nextdetail.conf import load_config
    from nextdetail.flows.pipeline import run_pipeline

    t0 = time.time()
    evals = []
    for seed in args.eval_seeds:
        cfg = load_config(args.preset, overrides=[f"storage.root={args.root}", f"decompose.order={max(args.orders)}",
                                                  f"tokenizer.order={order}", "eval.checkpoints=last",
                                                  f"eval.seed={seed}", *args.override])
        results = run_pipeline(cfg, until="evaluate", progress=False)
        evals.append(json.loads(Path(results["evaluate"].url, "metrics.json").read_text()))
    ev, ar, tok = results["evaluate"], results["train_ar"].summary, results["train_tokenizer"].summary
    metrics = evals[0]
    row = metrics["checkpoints"][-1]
    fids = [m["checkpoints"][-1]["fid"] for m in evals]
    return {
        "order": order, "token_maps": ar["token_maps"], "tokens_per_image": ar["tokens_per_image"],
        "fid": round(float(np.mean(fids)), 4), "fid_per_seed": fids,
        "fid_spread": round(float(max(fids) - min(fids)), 4),  # sampling noise: the same model, other seeds
        "kid": row.get("kid_mean"), "isc": row.get("isc_mean"),
        "precision": row.get("precision"), "recall": row.get("recall"),
        "rfid": (metrics.get("tokenizer") or {}).get("rfid"), "psnr": (metrics.get("tokenizer") or {}).get("psnr"),
        "tokenizer_final_rec": tok.get("final_rec"), "ar_final_loss": ar["final_loss"],
        "ar_best_val_loss": ar["best_val_loss"], "samples": row["samples"], "extractor": metrics["extractor"]["name"],
        "seconds": round(time.time() - t0, 1), "report": ev.report_url,
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    orders = [r["order"] for r in rows]
    panels = [("fid", "FID ↓ (generated)"), ("rfid", "rFID ↓ (tokenizer)"), ("kid", "KID ↓"),
              ("precision", "precision / recall ↑")]
    fig, axes = plt.subplots(1, len(panels), figsize=(13, 3.2), dpi=100)
    for ax, (key, title) in zip(axes, panels, strict=True):
        ax.plot(orders, [r[key] for r in rows], "o-", color="C0", label=key)
        if key == "fid":  # every sampling seed's FID: the spread is the evaluation's own noise
            for r in rows:
                ax.plot([r["order"]] * len(r["fid_per_seed"]), r["fid_per_seed"], "_", color="0.4", markersize=10)
        if key == "precision":
            ax.plot(orders, [r["recall"] for r in rows], "s-", color="C1", label="recall")
            ax.legend(fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("decomposition order (0 = VAR)")
        ax.set_xticks(orders)
        ax.grid(alpha=0.3)
    fig.suptitle(f"CART Table 4 at small scale ({rows[0]['extractor']}, {rows[0]['samples']} samples per order and "
                 f"seed; grey ticks: FID per sampling seed)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    from nextdetail.flows.runtime import configure_environment

    configure_environment()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--orders", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--root", default="./nextdetail-data/bench-order-ablation")
    p.add_argument("--eval-seeds", type=int, nargs="+", default=[0, 1],
                   help="sampling seeds of the evaluation: FID is their mean, their spread the noise floor")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    args.root = str(Path(args.root).resolve())
    rows = [run_order(n, args) for n in sorted(args.orders)]
    base = next((r["fid"] for r in rows if r["order"] == 0), None)
    for r in rows:
        r["ratio"] = round(r["fid"] / base, 4) if base and r["fid"] is not None else None
    best = min(rows, key=lambda r: r["fid"])
    out = {"figure": "order_ablation_fid", "baseline": base, "best_order": best["order"], "best_fid": best["fid"],
           "ratio": best["ratio"], "rows": rows, "overrides": args.override}
    Path(args.root).mkdir(parents=True, exist_ok=True)
    plot(rows, Path(args.root, "order_ablation.png"))
    Path(args.root, "order_ablation.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
