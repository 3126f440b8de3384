"""The `evaluate` stage: samples of each checkpoint against reference statistics (FID, IS, KID,
precision/recall via torch-fidelity) and the tokenizer's rFID/PSNR → report.md. Flow: `flow.py`; the shared,
content-addressed reference statistics and tokenizer metrics: `reference_stats.py`, `tokenizer_metrics.py`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nextdetail.conf.schema import PipelineConfig
from nextdetail.pipeline.declaration import Stage, path_fingerprint
from nextdetail.pipeline.result import StageResult
from nextdetail.storage.labels import checkpoint_name


def _eval_inputs(cfg: PipelineConfig) -> dict[str, Any]:
    e, out = cfg.eval, {}
    if "/" in e.reference or e.reference.endswith(".npz"):  # a folder or .npz outside the pipeline
        out["reference"] = path_fingerprint(e.reference, cfg.storage.options if "://" in e.reference else {})
    if e.extractor == "inception-v3-compat" and e.inception_weights:
        out["inception_weights"] = path_fingerprint(e.inception_weights, {})
    return out


def _eval_settings(cfg: PipelineConfig) -> dict[str, Any]:
    s = cfg.sample
    return {"eval": cfg.eval.identity_settings(), "ar.model": cfg.ar.model,
            "sample": {k: getattr(s, k) for k in s.evaluation_fields(cfg.ar.model)}}


@dataclass
class EvalResult(StageResult):  # url: report.md, metrics.json, grid.png, grids/, curves.png, samples/
    reference: dict[str, Any] | None = None  # url, identity, work of the reference statistics

    REPORT = ("report.md", "metrics.json")

    @property
    def report_url(self) -> str:
        return f"{self.url}/report.md"

    @staticmethod
    def describe(summary: dict[str, Any]) -> str:
        nums = ", ".join(f"{k} {summary[k]:.4g}" for k in ("fid", "isc_mean", "kid_mean", "precision", "recall")
                         if summary.get(k) is not None)
        tok = f"; tokenizer rFID {summary['rfid']:.4g}, PSNR {summary['psnr']:.2f} dB" if summary.get("rfid") is not None else ""
        note = "" if summary["comparable"] else f" ({summary['extractor']}: not comparable with published numbers)"
        return (f"evaluate: {checkpoint_name(summary)}, {summary['samples']} samples: "
                f"{nums}{tok}{note}")

    def outputs(self) -> list[tuple[str, str]]:
        ref = self.reference or {}
        curves = f"  {self.url}/curves.png" if self.summary.get("checkpoints", 1) > 1 else ""
        return [("report", f"{self.report_url}   (what was evaluated, the numbers, the pictures)"),
                ("numbers", f"{self.url}/metrics.json   pictures: {self.url}/grid.png{curves}"),
                ("reference", f"{ref.get('url')}   ({ref.get('work')}; identity {str(ref.get('identity'))[:16]})")]


STAGE = Stage("evaluate", "metrics", ("shard", "train_tokenizer", "tokenize", "train_ar"), _eval_settings, EvalResult,
              inputs=_eval_inputs, family="sampler", dask=lambda c: c.eval.resources is not None,
              resources=lambda c: ("eval.resources", c.eval.resources))
