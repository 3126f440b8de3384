"""Benchmark: NDP's compute dial — image quality versus forward FLOPs per image.

One NDP pipeline (`--model ndp`: dyadic tokenizer trained with region-wise truncation, the masked model
with its difficulty head) is evaluated at budgets from 10 % to 100 % of full refinement for every
difficulty estimator (learned, entropy, oracle, random, uniform = VAR's breadth-first order). Beside
it, at full compute: VAR (the block-causal transformer on the same dyadic token cache, `ar.model=cart`)
and CART (the preset's base/detail pipeline), and CART's detail dial (`sample.detail_budget`: detail tokens
only in the patches its detail head ranks hardest) at `--detail-budgets`. Quality is the evaluation stage's FID (`eval.*` of the
preset: on `tiny` the offline random-feature extractor — it ranks models, it is not comparable with
published FID); compute is the forward FLOPs each image cost (both CFG halves), counted from the
leaves every pass saw (`models/flops.py`).

    python benchmarks/ndp_curve.py [--preset tiny] [--budgets 0.1 0.2 …] [--estimators …] [--root DIR] [-o k=v …]

Prints one JSON line: `rows` (estimator, budget, GFLOPs per image, FID, KID), `baseline` = uniform
refinement's FID at 100 %, and the paper's claim tested: for each estimator, the least compute at which
its FID is within `--tolerance` of that baseline (linear interpolation between budgets) as a fraction of
uniform's full compute (`ratio` = the learned head's; ≈ 0.5 would be "equal quality at half the
compute"). `--codes plain normalized` adds NDP's tokenizer with LlamaGen's normalized codes (NDP §2.1,
`tokenizer.normalized_codes`) as a second set of curves (`claims` per set). Writes ndp_curve.png and ndp_curve.json under <root>/bench-ndp-curve/. Every point is a cached
evaluate artifact, and the stages are `make run`'s where they coincide: a re-run computes only new points.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

CODES = {"plain": [], "normalized": ["tokenizer.normalized_codes=true"]}


def curve_name(estimator: str, codes: str) -> str:
    """A curve's name in the claims and the legend: the estimator, and the codes unless plain."""
    return estimator if codes == "plain" else f"{estimator} ({codes} codes)"


def evaluate(args: argparse.Namespace, *overrides: str, model: str | None = None) -> tuple[dict, dict]:
    """The pipeline to its evaluate stage (cached stages reused): (last checkpoint's metrics row, results).
    `model`: as `--model` (the model's settings, then the preset's own for it, then `overrides`)."""
    from nextdetail.conf import load_config
    from nextdetail.pipeline.run import run_pipeline

    cfg = load_config(args.preset, overrides=[f"storage.root={args.root}", "eval.checkpoints=last", *overrides,
                                              *args.override], model=model)
    results = run_pipeline(cfg, until="evaluate", progress=False)
    metrics = json.loads(Path(results["evaluate"].url, "metrics.json").read_text())
    return metrics["checkpoints"][-1], {"metrics": metrics, "results": results}


def point(row: dict, **extra: object) -> dict:
    return {**extra, "gflops": row["gflops_per_image"], "fid": row["fid"], "kid": row.get("kid_mean"),
            "precision": row.get("precision"), "recall": row.get("recall"), "samples": row["samples"]}


def compute_to_reach(rows: list[dict], target: float) -> float | None:
    """The least GFLOPs at which FID ≤ target along the curve (linear between budgets); None if never."""
    rows = sorted(rows, key=lambda r: r["gflops"])
    for a, b in zip([None, *rows[:-1]], rows, strict=True):
        if b["fid"] <= target:
            if a is None or a["fid"] == b["fid"]:
                return b["gflops"]
            t = (a["fid"] - target) / (a["fid"] - b["fid"])
            return a["gflops"] + t * (b["gflops"] - a["gflops"])
    return None


def plot(rows: list[dict], baselines: list[dict], path: Path, extractor: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    curves = dict.fromkeys((r["estimator"], r.get("codes", "plain")) for r in rows)
    for i, (est, codes) in enumerate(curves):
        pts = sorted((r for r in rows if (r["estimator"], r.get("codes", "plain")) == (est, codes)),
                     key=lambda r: r["gflops"])
        name = est if est.startswith("CART") else f"NDP {curve_name(est, codes)}"
        ax.plot([r["gflops"] * 1e3 for r in pts], [r["fid"] for r in pts], "o-" if codes == "plain" else "s:",
                color=f"C{i}", label=name, markersize=4)
    for j, b in enumerate(baselines):
        ax.plot([b["gflops"] * 1e3], [b["fid"]], "*", color=f"C{6 + j}", markersize=12, label=f"{b['model']} (full)")
    ax.set_xlabel("forward MFLOPs per image (both CFG halves)")
    ax.set_ylabel("FID ↓")
    ax.set_title(f"NDP: quality vs compute ({extractor}; budgets 10–100 %)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    from nextdetail.pipeline.runtime import configure_environment

    configure_environment()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5, 0.7, 1.0])
    p.add_argument("--estimators", nargs="+", default=["learned", "entropy", "oracle", "random", "uniform"])
    p.add_argument("--codes", nargs="+", default=["plain"], choices=sorted(CODES),
                   help="NDP tokenizer codes: plain (L2 codebook) and/or normalized (LlamaGen's, NDP §2.1)")
    p.add_argument("--tolerance", type=float, default=0.05, help="'equal quality': FID within this fraction")
    p.add_argument("--no-baselines", action="store_true", help="skip the VAR and CART points")
    p.add_argument("--detail-budgets", type=float, nargs="*", default=[0.25, 0.5], help="CART's detail dial")
    p.add_argument("--root", default="./nextdetail-data", help="storage root (default: make run's, whose stages it reuses)")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    args.root = str(Path(args.root).resolve())
    t0 = time.time()
    rows, extractor = [], None
    for codes, estimator in ((c, e) for c in args.codes for e in args.estimators):
        for budget in sorted(args.budgets):
            row, got = evaluate(args, *CODES[codes], f"sample.budget={budget}", f"sample.estimator={estimator}",
                                model="ndp")
            extractor = got["metrics"]["extractor"]["name"]
            tok = got["metrics"].get("tokenizer") or {}
            rows.append(point(row, estimator=estimator, budget=budget, codes=codes, rfid=tok.get("rfid"),
                              psnr=tok.get("psnr")))
            print(json.dumps({"progress": rows[-1]}), flush=True)
    baselines = []
    if not args.no_baselines:
        var_row, _ = evaluate(args, "ar.model=cart", model="ndp")  # the same tokens, VAR's model
        baselines.append(point(var_row, model="VAR (block-causal, same dyadic tokens)"))
        cart_row, _ = evaluate(args)
        baselines.append(point(cart_row, model="CART (preset)"))
        dial = [point(cart_row, estimator="CART detail dial", budget=1.0)]
        for budget in sorted(args.detail_budgets):
            row, _ = evaluate(args, f"sample.detail_budget={budget}")
            dial.append(point(row, estimator="CART detail dial", budget=budget))
        out_dial = sorted(dial, key=lambda r: r["budget"])
    dial_rows = out_dial if not args.no_baselines else []
    claims, fulls = {}, {}
    for codes in args.codes:  # each set of curves against its own uniform refinement at full budget
        uniform = [r for r in rows if r["estimator"] == "uniform" and r["codes"] == codes]
        if not uniform:
            continue
        full = fulls[codes] = max(uniform, key=lambda r: r["budget"])
        target = full["fid"] * (1 + args.tolerance)
        for est in dict.fromkeys(r["estimator"] for r in rows if r["codes"] == codes):
            reach = compute_to_reach([r for r in rows if r["estimator"] == est and r["codes"] == codes], target)
            claims[curve_name(est, codes)] = None if reach is None else round(reach / full["gflops"], 4)
    full = fulls.get(args.codes[0])
    out = {"figure": "ndp_compute_to_uniform_full_quality", "baseline": full and full["fid"],
           "baseline_gflops": full and full["gflops"], "ratio": claims.get(curve_name("learned", args.codes[0])),
           "claims": claims, "uniform_full": fulls,
           "tolerance": args.tolerance, "extractor": extractor, "rows": rows, "full_compute": baselines,
           "cart_detail_dial": dial_rows,
           "seconds": round(time.time() - t0, 1), "overrides": args.override}
    bench = Path(args.root, "bench-ndp-curve")
    bench.mkdir(parents=True, exist_ok=True)
    plot(rows + dial_rows, baselines, bench / "ndp_curve.png", extractor or "")
    (bench / "ndp_curve.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
