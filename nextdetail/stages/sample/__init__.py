"""The `sample` stage: class-conditional samples of the trained transformer with CFG (PNG grids beside a real
photo per class, a webdataset tar, CART's ×2 patch-wise upscale). Flow: `flow.py`; the task: `tasks.py`."""

from __future__ import annotations

from dataclasses import dataclass

from nextdetail.pipeline.declaration import Stage
from nextdetail.pipeline.result import StageResult


@dataclass
class SampleResult(StageResult):  # url: grid.png, grids/, images/, samples.tar, hires/, summary.json
    @staticmethod
    def describe(summary: dict) -> str:
        hires = (f"; ×{summary['upscale']} patch-wise {summary['hires_images_per_s']} images/s"
                 if summary.get("hires_images_per_s") else "")
        ndp = (f"; NDP budget {summary['budget']:.0%} ({summary['estimator']}): {summary['gflops_per_image']} GFLOPs, "
               f"{summary['tokens_per_image']} tokens per image" if summary.get("model") == "ndp" else
               f"; detail dial {summary['detail_budget']:.0%} of patches: {summary['gflops_per_image']} GFLOPs per image"
               if summary.get("detail_budget") else "")
        return (f"sample: {summary['images']} images ({summary['classes']} classes × {summary['per_class']}), cfg "
                f"{summary['cfg']}, {summary['images_per_s']} images/s, {summary['forward_passes_per_image']} forward "
                f"passes per image{hires}{ndp}")

    def outputs(self) -> list[tuple[str, str]]:
        out = [("look at", f"{self.url}/grid.png   (per class: a real photo, then its samples)")]
        if self.summary.get("model") == "ndp":
            out.append(("", f"{self.url}/heatmap.png   (each sample beside how deep each patch was refined)"))
        elif self.summary.get("upscale", 1) > 1:
            out.append(("", f"{self.url}/hires/grid.png   (×{self.summary['upscale']}: bilinear vs CART's upscaled "
                            "base + patch-wise detail)"))
        return [*out, ("samples", f"{self.url}/samples.tar   (webdataset: png, cls)   {self.url}/images/")]


STAGE = Stage("sample", "samples", ("shard", "tokenize", "train_ar"),
              lambda c: {"ar.model": c.ar.model, "sample": c.sample.identity_settings(c.ar.model)}, SampleResult,
              family="sampler", dask=lambda c: c.sample.resources is not None,
              resources=lambda c: ("sample.resources", c.sample.resources))
