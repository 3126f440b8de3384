"""The `train_ar` stage: a real token cache → the transformer (its samples: test_sample.py)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FAST, make_config

from nextdetail.storage.fs import Store


def _pipeline(cfg, until: str):
    from nextdetail.pipeline.run import run_pipeline

    return run_pipeline(cfg, until=until, progress=False)


def _data(cfg, results):
    from nextdetail.stages.train_ar.flow import ar_data

    return ar_data(cfg, results["shard"], results["train_tokenizer"], results["tokenize"])


@pytest.mark.e2e
def test_training_loss_falls_far_below_uniform_and_below_the_token_entropy(pipeline, tmp_path):
    """Longer than the fixture's run: the loss ends well under log V and under the entropy of the
    tokens' own frequencies (what a model ignoring class and context could reach)."""
    from nextdetail.stages.train_ar.tasks import train

    _, cfg, results = pipeline
    data = _data(cfg, results)
    ar = cfg.ar.model_copy(update={"steps": 150, "warmup_steps": 10, "checkpoint_every": 150, "log_every": 50,
                                   "base_lr": 2e-3, "base_batch": 16})
    summary = train(Store(str(tmp_path)), data, ar, log=lambda _: None)
    cache = data.open_cache()
    counts = np.zeros(summary["vocab_size"])
    for split, tar in {(r["split"], r["shard"]) for r in cache.index().to_pylist()}:
        if split == "train":
            counts += np.bincount(cache.read(split, tar).ravel().astype(np.int64), minlength=len(counts))
    p = counts[counts > 0] / counts.sum()
    unigram = float(-(p * np.log(p)).sum())
    assert summary["final_loss"] < 0.6 * math.log(summary["vocab_size"])
    assert summary["final_loss"] < unigram - 0.2, (summary["final_loss"], unigram)
    assert summary["best_val_loss"] < unigram


@pytest.mark.e2e
def test_a_resumed_run_repeats_the_uninterrupted_loss_trajectory(pipeline, tmp_path):
    from nextdetail.stages.train_ar.tasks import train
    from nextdetail.storage.checkpoints import latest_checkpoint, load_checkpoint

    _, cfg, results = pipeline
    data = _data(cfg, results)
    whole, parts = Store(str(tmp_path / "whole")), Store(str(tmp_path / "parts"))
    train(whole, data, cfg.ar, log=lambda _: None)
    assert train(parts, data, cfg.ar, log=lambda _: None, stop_after=6) == {"stopped_at": 6}
    assert latest_checkpoint(parts) == "checkpoints/step-00000004.pt"  # steps 5–6 are lost with the "kill"
    train(parts, data, cfg.ar, log=lambda _: None)
    a = load_checkpoint(whole, latest_checkpoint(whole))["metrics"]
    b = load_checkpoint(parts, latest_checkpoint(parts))["metrics"]
    assert [m["step"] for m in b] == list(range(1, cfg.ar.steps + 1))
    np.testing.assert_allclose([m["loss"] for m in b], [m["loss"] for m in a], rtol=1e-6)
    assert b[-1]["loss"] != b[0]["loss"]
    for key in ("transformer.pt", "best.pt"):
        sa = torch.load(tmp_path / "whole" / key, weights_only=True)["model"]
        sb = torch.load(tmp_path / "parts" / key, weights_only=True)["model"]
        for name in sa:
            torch.testing.assert_close(sa[name], sb[name], rtol=1e-5, atol=1e-6)


@pytest.mark.e2e
def test_torchrun_data_parallel_training_matches_one_process_on_the_same_global_batches(pipeline, embedded_source):
    """ar.nproc=2: the Prefect task launches torchrun (gloo on CPU); each rank trains on its half of every global
    batch with DDP's averaged gradients. One process stepping on the two halves put together (no class dropout,
    no drop path: nothing random per rank) ends with the same weights, and the logged losses are the global
    batch's."""
    from nextdetail.stages.train_ar.tasks import ARTraining, load_transformer
    from nextdetail.storage.token_loader import TokenBatches

    root, _, _ = pipeline
    knobs = (*FAST, "ar.steps=4", "ar.class_dropout=0", "ar.drop_path=0", "ar.warmup_steps=1")
    two = _pipeline(make_config(root, embedded_source, *knobs, "ar.nproc=2"), until="train_ar")
    result = two["train_ar"]
    assert result.work == "ran" and result.summary["processes"] == 2 and result.summary["steps"] == 4

    cfg = make_config(root, embedded_source, *knobs)
    one = ARTraining(_data(cfg, two), cfg.ar)
    one.build(0, 1, torch.device("cpu"), log=lambda _: None)
    cache, half = one.data.open_cache(), cfg.ar.batch_size // 2
    ranks = [TokenBatches(cache, cfg.ar.split, half, cfg.ar.seed, rank=r, world=2) for r in (0, 1)]
    losses = []
    for step in range(4):
        e, b = divmod(step, ranks[0].batches_per_epoch)
        halves = [r[(e, b)] for r in ranks]
        batch = (torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves]))
        losses.append(one.step(step, batch)["loss"])

    logged = [m["loss"] for m in csv_rows(Path(result.url, "metrics.csv"))]
    np.testing.assert_allclose(logged, losses, rtol=1e-4)
    model, record = load_transformer(str(Path(result.url, "transformer.pt")))
    assert record["step"] == 4 and losses[-1] != losses[0]
    mine = one.trainer.model.state_dict()
    for name, t in model.state_dict().items():
        torch.testing.assert_close(t, mine[name], rtol=1e-4, atol=1e-5, msg=name)


def csv_rows(path: Path) -> list[dict]:
    import csv

    with open(path) as f:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(f)]
