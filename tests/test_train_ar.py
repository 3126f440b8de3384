"""The `train_ar` and `sample` stages: a real token cache → the transformer → class-conditional samples."""

from __future__ import annotations

import json
import math
import tarfile
from pathlib import Path

import numpy as np
import torch
from conftest import FAST, make_config, run_cli

from nextdetail.storage.fs import Store


def _pipeline(cfg, until: str):
    from nextdetail.flows.pipeline import run_pipeline

    return run_pipeline(cfg, until=until, progress=False)


def _data(cfg, results):
    from nextdetail.flows.train_ar import ar_data

    return ar_data(cfg, results["shard"], results["train_tokenizer"], results["tokenize"])


def test_training_loss_falls_far_below_uniform_and_below_the_token_entropy(pipeline, tmp_path):
    """Longer than the fixture's run: the loss ends well under log V and under the entropy of the
    tokens' own frequencies (what a model ignoring class and context could reach)."""
    from nextdetail.tasks.train_ar import train

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


def test_a_resumed_run_repeats_the_uninterrupted_loss_trajectory(pipeline, tmp_path):
    from nextdetail.storage.checkpoints import latest_checkpoint, load_checkpoint
    from nextdetail.tasks.train_ar import train

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


def test_stage_outputs_samples_grids_and_a_webdataset_tar(pipeline):
    import webdataset as wds
    from PIL import Image

    _, cfg, results = pipeline
    ar, sample = results["train_ar"], results["sample"]
    for name in ("transformer.pt", "best.pt", "metrics.csv", "loss.png", "summary.json"):
        assert Path(ar.url, name).is_file(), name
    rows = Path(ar.url, "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss,acc") and len(rows) == cfg.ar.steps + 1
    classes = json.loads(Path(results["shard"].url, "classes.json").read_text())["classes"]
    out = Path(sample.url)
    assert Image.open(out / "grid.png").size[0] > 64
    for c in (0, 5):
        stem = f"{c:04d}-{classes[c]}"
        assert (out / "grids" / f"{stem}.png").is_file()
        pngs = sorted((out / "images" / stem).glob("*.png"))
        assert len(pngs) == 2 and Image.open(pngs[0]).size == (32, 32)
        hires = sorted((out / "hires" / "images" / stem).glob("*.png"))
        assert len(hires) == 2 and Image.open(hires[0]).size == (64, 64)
    samples = list(wds.WebDataset(str(out / "samples.tar"), shardshuffle=False).decode("rgb"))
    assert sorted(int(s["cls"]) for s in samples) == [0, 0, 5, 5]
    assert samples[0]["png"].shape == (32, 32, 3)
    with tarfile.open(out / "samples.tar") as tf:
        assert len(tf.getnames()) == 8  # png + cls per sample
    assert sample.summary["forward_passes_per_image"] == 7 and sample.summary["images_per_s"] > 0


def test_changing_a_sampling_knob_resamples_only_and_training_knob_retrains(pipeline, embedded_source):
    root, _, results = pipeline
    again = _pipeline(make_config(root, embedded_source, *FAST), until="sample")
    assert again["train_ar"].work == "up to date" and again["sample"].work == "up to date"
    cfg = make_config(root, embedded_source, *FAST, "sample.cfg=3.0")
    changed = _pipeline(cfg, until="sample")
    assert changed["train_ar"].work == "up to date" and changed["tokenize"].work == "up to date"
    assert changed["sample"].work == "ran" and changed["sample"].url != results["sample"].url
    retrained = _pipeline(make_config(root, embedded_source, *FAST, "ar.steps=8", "ar.checkpoint_every=8"),
                          until="train_ar")
    assert retrained["train_tokenizer"].work == "up to date"
    assert retrained["train_ar"].work == "ran" and retrained["train_ar"].identity != results["train_ar"].identity


def test_sampling_is_reproducible_by_seed_and_class_conditional_shapes(pipeline, tmp_path):
    from nextdetail.conf.schema import SampleConfig
    from nextdetail.tasks.sample import generate, load_models

    _, _, results = pipeline
    sampler, record = load_models(results["train_ar"].checkpoint_url, {}, "cpu")
    cfg = SampleConfig(per_class=3, batch_size=2, upscale=2, seed=7)
    a = generate(sampler, [1, 3], cfg, "cpu")
    b = generate(sampler, [3], cfg, "cpu")  # class 3's samples do not depend on which other classes ran
    c = generate(sampler, [3], cfg.model_copy(update={"seed": 8}), "cpu")
    np.testing.assert_array_equal(a["images"][3], b["images"][3])
    np.testing.assert_array_equal(a["hires"][3], b["hires"][3])
    assert not np.array_equal(b["images"][3], c["images"][3])
    assert a["images"][1].shape == (3, 32, 32, 3) and a["hires"][1].shape == (3, 64, 64, 3)
    assert len(record["classes"]) == 12


def test_upscaled_samples_keep_the_given_base_and_resample_only_details(pipeline):
    from nextdetail.models.quant import NextInput
    from nextdetail.tasks.sample import load_models

    _, _, results = pipeline
    sampler, _ = load_models(results["train_ar"].checkpoint_url, {}, "cpu")
    labels = torch.tensor([0, 4])
    out = sampler.sample(labels, cfg=1.0, generator=torch.Generator().manual_seed(0))
    n_base = sampler.n_base
    given = [m.clone() for m in out.maps[:n_base]]
    maps = sampler.transformer.sample(labels, NextInput(sampler.quantizer, sampler.latent_side), 1.0,
                                      generator=torch.Generator().manual_seed(1), given=given)
    for k in range(n_base):
        assert torch.equal(maps[k], given[k])
    assert any(not torch.equal(maps[k], out.maps[k]) for k in range(n_base, len(maps)))
    big = sampler.upscale(labels, out.maps, 2, generator=torch.Generator().manual_seed(0))
    assert big.shape == (2, 3, 64, 64) and big.abs().max() <= 1
    # the upscaled image is the trained-size sample enlarged, not another image: low frequencies agree
    small = torch.nn.functional.avg_pool2d(big, 2)
    assert (small - out.images).abs().mean() < (small - out.images.flip(0)).abs().mean()


def test_sample_cli_with_a_checkpoint(pipeline, tmp_path):
    import sys

    nextdetail = str(Path(sys.executable).parent / "nextdetail")
    _, _, results = pipeline
    out = tmp_path / "cli-samples"
    proc = run_cli([nextdetail, "sample", "--ckpt", results["train_ar"].checkpoint_url,
                    "--classes", "2", "--n", "3", "--cfg", "1.0", "--seed", "3", "--upscale", "1", "--out", str(out),
                    "--no-progress"])
    assert proc.returncode == 0, proc.stderr
    assert len(list((out / "images").glob("0002-*/*.png"))) == 3 and (out / "grid.png").is_file()
    assert not (out / "hires").exists()
    bad = run_cli([nextdetail, "sample", "--ckpt", str(tmp_path / "nope.pt"), "--out", str(out)])
    assert bad.returncode == 2 and "no such checkpoint" in bad.stderr and "Traceback" not in bad.stderr


def test_torchrun_data_parallel_training_matches_one_process_on_the_same_global_batches(pipeline, embedded_source):
    """ar.nproc=2: the Prefect task launches torchrun (gloo on CPU); each rank trains on its half of every global
    batch with DDP's averaged gradients. One process stepping on the two halves put together (no class dropout,
    no drop path: nothing random per rank) ends with the same weights, and the logged losses are the global
    batch's."""
    from nextdetail.storage.token_loader import TokenBatches
    from nextdetail.tasks.train_ar import ARTraining, load_transformer

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
