"""The `train_tokenizer` stage: shard tars (+ factors) → the CART tokenizer (VAR-style multi-scale base
quantization and full-resolution detail maps, one codebook), or adopts released weights. Flow: `flow.py`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nextdetail.conf.schema import PipelineConfig
from nextdetail.pipeline.declaration import Stage, file_sha256
from nextdetail.pipeline.result import StageResult


def _tokenizer_settings(cfg: PipelineConfig) -> dict[str, Any]:
    """Training: every `tokenizer.*` setting that changes the weights. Adopting a released file: the declared
    architecture alone (the file's sha256 is its input)."""
    if cfg.tokenizer.pretrained:
        from nextdetail.models.configs import TokenizerSpec

        return {"tokenizer": {"pretrained": True, "architecture": TokenizerSpec.from_config(cfg).to_dict()}}
    return {"tokenizer": cfg.tokenizer.identity_settings()}


def _tokenizer_inputs(cfg: PipelineConfig) -> dict[str, Any]:
    t = cfg.tokenizer
    if t.pretrained:
        return {"pretrained": file_sha256(t.pretrained, cfg.storage.options if "://" in t.pretrained else {})}
    return {}


@dataclass
class TokenizerResult(StageResult):  # url: tokenizer.pt, metrics.json, curves.png, reconstructions.png, checkpoints/
    @property
    def checkpoint_url(self) -> str:
        return f"{self.url}/tokenizer.pt"

    @staticmethod
    def describe(summary: dict) -> str:
        if summary.get("adopted_from"):
            return (f"train_tokenizer: adopted {summary['adopted_from']} ({summary['layout']} layout), "
                    f"{summary['token_maps']} token maps, no training")
        return (f"train_tokenizer: {summary['steps']} steps, {summary['token_maps']} token maps, final rec "
                f"{summary['final_rec']:.4f}" + (f" ({summary['rec_psnr_db']} dB)" if summary.get("rec_psnr_db") else "")
                + f", code usage last map {summary['code_usage_per_map'][-1]:.2f}")

    def outputs(self) -> list[tuple[str, str]]:
        if self.summary.get("adopted_from"):
            return [("tokenizer", f"{self.checkpoint_url}   (the adopted weights; reconstructions: tokenize's preview)")]
        return [("tokenizer", self.checkpoint_url),
                ("pictures", f"{self.url}/reconstructions.png  {self.url}/curves.png")]


STAGE = Stage("train_tokenizer", "tokenizer", ("shard", "decompose"), _tokenizer_settings, TokenizerResult,
              inputs=_tokenizer_inputs, adopts=lambda c: c.tokenizer.pretrained, content_sha256="tokenizer_sha256",
              # On a Dask worker offering tokenizer.resources, or across tokenizer.nodes hosts' workers (train_ar's way)
              dask=lambda c: not c.tokenizer.pretrained and (c.tokenizer.resources is not None or c.tokenizer.nodes > 1),
              resources=lambda c: ("tokenizer.resources", None if c.tokenizer.pretrained else c.tokenizer.resources),
              nodes=lambda c: ("tokenizer.nodes", 1 if c.tokenizer.pretrained else c.tokenizer.nodes),
              command_help="shards + factors → a trained base-detail VQ-VAE (CART §3.2)",
              command_description=("Run the stages up to train_tokenizer: tokenizer.pt, metrics, curves.png and reconstructions.png "
                                   "under <storage.root>/tokenizer/. Resumes from its last checkpoint when interrupted "
                                   "(settings: -o tokenizer.steps=… etc.)."))
