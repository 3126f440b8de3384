"""The `train_ar` stage: a published token cache → the next-detail transformer (CART §3.3, or NDP's), or
adopts VAR's released weights. Flow: `flow.py`; the training task: `tasks.py`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nextdetail.conf.schema import PipelineConfig
from nextdetail.pipeline.declaration import Stage, file_sha256
from nextdetail.pipeline.result import StageResult


def _ar_settings(cfg: PipelineConfig) -> dict[str, Any]:
    """Training: every `ar.*` setting that changes the weights. Adopting VAR's weights: the architecture alone."""
    a = cfg.ar
    if a.pretrained:
        return {"ar": {"pretrained": True, **{k: getattr(a, k) for k in sorted(a.ARCHITECTURE_FIELDS)}}}
    return {"ar": a.identity_settings()}


def _ar_inputs(cfg: PipelineConfig) -> dict[str, Any]:
    a = cfg.ar
    return {"pretrained": file_sha256(a.pretrained, cfg.storage.options if "://" in a.pretrained else {})} \
        if a.pretrained else {}


@dataclass
class ARResult(StageResult):  # url: transformer.pt, best.pt, metrics.csv, loss.png, summary.json, checkpoints/
    @property
    def checkpoint_url(self) -> str:
        return f"{self.url}/transformer.pt"

    @staticmethod
    def describe(summary: dict) -> str:
        if summary.get("adopted_from"):
            return (f"train_ar: adopted {summary['adopted_from']} ({summary['layout']} layout), "
                    f"{summary['parameters'] / 1e6:.2f} M parameters, {summary['token_maps']} token maps, no training")
        return (f"train_ar: {summary['steps']} steps, {summary['parameters'] / 1e6:.2f} M parameters, {summary['token_maps']} "
                f"token maps, loss {summary['final_loss']} (uniform {summary['uniform_loss']}), token accuracy "
                f"{summary['final_acc']}, best held-out loss {summary['best_val_loss']} at step {summary['best_step']}")

    def outputs(self) -> list[tuple[str, str]]:
        if self.summary.get("adopted_from"):
            return [("model", f"{self.checkpoint_url}   (the adopted weights, step 0; best.pt the same)")]
        return [("model", f"{self.checkpoint_url}   (and best.pt: lowest held-out loss)"),
                ("curves", f"{self.url}/loss.png   {self.url}/metrics.csv")]


STAGE = Stage("train_ar", "transformer", ("shard", "train_tokenizer", "tokenize"), _ar_settings, ARResult,
              inputs=_ar_inputs, family="model", content_sha256="weights_sha256",
              # On a Dask worker offering ar.resources (the GPU machines; the CLI's needs none), or across ar.nodes
              # hosts' workers: the cluster is checked for them before any stage runs.
              dask=lambda c: c.ar.resources is not None or c.ar.nodes > 1,
              resources=lambda c: ("ar.resources", c.ar.resources),
              nodes=lambda c: ("ar.nodes", c.ar.nodes),
              command_help="token cache → the next-detail transformer (CART §3.3)",
              command_description=("Run the stages up to train_ar: transformer.pt, best.pt, metrics.csv and loss.png under "
                                   "<storage.root>/transformer/. Resumes from its last checkpoint; -o ar.nproc=N trains "
                                   "N processes with torchrun; -o ar.resources='{GPU: 1}' on a Dask worker offering "
                                   "them; -o ar.nodes=N across N hosts' workers (dask.address)."))
