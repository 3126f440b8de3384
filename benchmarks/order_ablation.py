"""Benchmark: CART's Table 4 at small scale — does the decomposition order help image quality, beyond training noise?

For each decomposition order n (0 = VAR: the multi-scale base only; n ≥ 1: the base B_n plus n detail
factors D_n … D_1), the whole pipeline runs from the same shards and the same order-4 decomposition
(order n uses B_1 … B_n of it): tokenizer, token cache, transformer, evaluation. Everything else is
equal — the tokenizer's and the transformer's architecture (depth, width), steps, batch sizes —
so higher orders see more token maps with the same model. Each (order, variant) is trained with every
`--train-seeds` seed (tokenizer.seed = ar.seed = the seed): the spread of FID over training seeds is reported
beside every mean, so an order's effect can be told from the noise of training a model once. Variants
separate two confounds of comparing orders (issue 27):
- `--cfg-schedules all_maps base_maps`: VAR's guidance ramp over all M maps weakens the last base map's guidance
  as maps are added; `base_maps` ramps over the base maps only (`sample.cfg_schedule`);
- `--loss-weightings map token`: per-map loss gives the base maps a share B/M that shrinks with the order;
  per-token loss (VAR's) weighs every token the same (`ar.loss_weighting`).
The score is the evaluation stage's (`eval.*` of the preset: on `tiny` the offline random-feature extractor,
whose numbers rank models but are not comparable with published FID).

    python benchmarks/order_ablation.py [--preset tiny] [--orders 0 1 3] [--train-seeds 0 1 2]
        [--cfg-schedules all_maps] [--loss-weightings map] [--eval-seeds 0] [--root DIR] [-o key=value …]
    python benchmarks/order_ablation.py --merge A/order_ablation.json B/order_ablation.json --root DIR

`--merge` trains nothing: it summarizes the runs of earlier results together (e.g. two variants run side by side
in two roots, one process each) and writes the table and figure under --root.

Prints one JSON line per run, then the summary: per (order, variant) FID over training seeds (mean, each seed,
min–max, std), its ratio to order 0 of the same variant (`baseline`), KID, IS, precision, recall, rFID, token
maps, tokens per image and seconds. Writes `order_ablation.png` and `order_ablation.json` under the root. Stages
are cached: a re-run with more orders or seeds runs only the new ones.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path


def run_one(order: int, seed: int, cfg_schedule: str, weighting: str, args: argparse.Namespace) -> dict:
    """One (order, training seed, variant): the pipeline once, then the evaluation again per extra sampling seed
    (training cached)."""
    import numpy as np

    from nextdetail.conf import load_config
    from nextdetail.pipeline.run import run_pipeline

    t0 = time.time()
    evals = []
    for eval_seed in args.eval_seeds:
        cfg = load_config(args.preset, overrides=[
            f"storage.root={args.root}", f"decompose.order={max(args.orders)}", f"tokenizer.order={order}",
            f"tokenizer.seed={seed}", f"ar.seed={seed}", f"sample.cfg_schedule={cfg_schedule}",
            f"ar.loss_weighting={weighting}", "eval.checkpoints=last", f"eval.seed={eval_seed}", *args.override])
        results = run_pipeline(cfg, until="evaluate", progress=False)
        evals.append(json.loads(Path(results["evaluate"].url, "metrics.json").read_text()))
    ev, ar = results["evaluate"], results["train_ar"].summary
    metrics = evals[0]
    row = metrics["checkpoints"][-1]
    fids = [m["checkpoints"][-1]["fid"] for m in evals]
    return {
        "order": order, "train_seed": seed, "cfg_schedule": cfg_schedule, "loss_weighting": weighting,
        "token_maps": ar["token_maps"], "tokens_per_image": ar["tokens_per_image"],
        "fid": round(float(np.mean(fids)), 4), "fid_per_eval_seed": fids,
        "kid": row.get("kid_mean"), "isc": row.get("isc_mean"), "precision": row.get("precision"),
        "recall": row.get("recall"), "rfid": (metrics.get("tokenizer") or {}).get("rfid"),
        "psnr": (metrics.get("tokenizer") or {}).get("psnr"), "ar_final_loss": ar["final_loss"],
        "ar_best_val_loss": ar["best_val_loss"], "samples": row["samples"], "extractor": metrics["extractor"]["name"],
        "seconds": round(time.time() - t0, 1), "report": ev.report_url,
    }


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (order, variant): means over training seeds with their spread, and the ratio to order 0."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["cfg_schedule"], r["loss_weighting"], r["order"]), []).append(r)
    rows = []
    for (schedule, weighting, order), rs in sorted(groups.items()):
        fids = [r["fid"] for r in rs]

        def mean(k: str, rs: list[dict] = rs) -> float | None:
            values = [r[k] for r in rs if r[k] is not None]
            return round(statistics.mean(values), 4) if values else None

        rows.append({"order": order, "cfg_schedule": schedule, "loss_weighting": weighting,
                     "token_maps": rs[0]["token_maps"], "tokens_per_image": rs[0]["tokens_per_image"],
                     "fid": round(statistics.mean(fids), 4), "fid_per_train_seed": fids,
                     "fid_min": min(fids), "fid_max": max(fids),
                     "fid_std": round(statistics.stdev(fids), 4) if len(fids) > 1 else None,
                     "kid": mean("kid"), "isc": mean("isc"), "precision": mean("precision"), "recall": mean("recall"),
                     "rfid": mean("rfid"), "train_seeds": len(rs), "samples": rs[0]["samples"],
                     "extractor": rs[0]["extractor"]})
    for r in rows:
        base = next((b for b in rows if b["order"] == 0 and b["cfg_schedule"] == r["cfg_schedule"]
                     and b["loss_weighting"] == r["loss_weighting"]), None)
        r["ratio"] = round(r["fid"] / base["fid"], 4) if base else None
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = sorted({(r["cfg_schedule"], r["loss_weighting"]) for r in rows})
    panels = [("fid", "FID ↓ (generated); ticks: each training seed"), ("rfid", "rFID ↓ (tokenizer)"),
              ("kid", "KID ↓"), ("recall", "recall ↑")]
    fig, axes = plt.subplots(1, len(panels), figsize=(14, 3.4), dpi=100)
    for ax, (key, title) in zip(axes, panels, strict=True):
        for i, v in enumerate(variants):
            vr = sorted((r for r in rows if (r["cfg_schedule"], r["loss_weighting"]) == v), key=lambda r: r["order"])
            ax.plot([r["order"] for r in vr], [r[key] for r in vr], "o-", color=f"C{i}", label=f"cfg {v[0]}, {v[1]}")
            if key == "fid":
                for r in vr:
                    ax.plot([r["order"]] * len(r["fid_per_train_seed"]), r["fid_per_train_seed"], "_",
                            color=f"C{i}", markersize=10)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("decomposition order (0 = VAR)")
        ax.set_xticks(sorted({r["order"] for r in rows}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(f"CART Table 4 at small scale ({rows[0]['extractor']}, {rows[0]['samples']} samples per run)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    from nextdetail.pipeline.runtime import configure_environment

    configure_environment()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--orders", type=int, nargs="+", default=[0, 1, 3])
    p.add_argument("--train-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--cfg-schedules", nargs="+", default=["all_maps"], choices=["all_maps", "base_maps"])
    p.add_argument("--loss-weightings", nargs="+", default=["map"], choices=["map", "token"])
    p.add_argument("--root", default="./nextdetail-data/bench-order-ablation")
    p.add_argument("--eval-seeds", type=int, nargs="+", default=[0],
                   help="sampling seeds of the evaluation (FID per run is their mean)")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--merge", nargs="+", default=[], metavar="JSON", help="summarize these results' runs; train nothing")
    args = p.parse_args()
    args.root = str(Path(args.root).resolve())
    runs = [r for path in args.merge for r in json.loads(Path(path).read_text())["runs"]]
    # Seeds outermost: a stopped run has every order at the seeds it finished.
    for seed, order, schedule, weighting in [] if args.merge else itertools.product(
            args.train_seeds, sorted(args.orders), args.cfg_schedules, args.loss_weightings):
        runs.append(run_one(order, seed, schedule, weighting, args))
        print(json.dumps(runs[-1]), flush=True)
    rows = summarize(runs)
    out = {"figure": "order_ablation_fid", "baseline": "order 0 of the same variant", "rows": rows, "runs": runs,
           "overrides": args.override}
    Path(args.root).mkdir(parents=True, exist_ok=True)
    plot(rows, Path(args.root, "order_ablation.png"))
    Path(args.root, "order_ablation.json").write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}))


if __name__ == "__main__":
    main()
