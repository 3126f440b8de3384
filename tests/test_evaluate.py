"""The `evaluate` stage: our metrics are torch-fidelity's, reference statistics are cached by content,
and the stage writes numbers people can trace and a report people can read."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FAST, make_config, run_cli
from PIL import Image

from nextdetail.errors import UserError
from nextdetail.models import fidelity, fidelity_merge
from nextdetail.models.feature_extractor import INCEPTION, RANDCONV, build_extractor
from nextdetail.stages.evaluate.reference_stats import ensure_reference, plan_reference, reference_spec
from nextdetail.storage.fs import Store

PROTOCOL = {"isc_splits": 4, "kid_subsets": 20, "kid_subset_size": 40, "prc_neighborhood": 3, "rng_seed": 2020}


def _images(source: str, split: str) -> np.ndarray:
    files = sorted(Path(source, split).glob("*/*.png"))
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])


def _write_folder(path: Path, images: np.ndarray) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(images):
        Image.fromarray(a).save(path / f"{i:05d}.png")
    return path


def _reference(root: Path, folder: Path, extractor: dict, **kw):
    spec = reference_spec(str(folder), "", "", "png", {}, None)
    artifact = plan_reference(Store(str(root)), spec, extractor)
    return artifact, ensure_reference(artifact, spec, RANDCONV, None, str(root / "weights"), 32, "cpu",
                                      log=lambda _: None, **kw)


def _features(model, images: np.ndarray) -> dict[str, np.ndarray]:
    return fidelity.extract(model, [images[i : i + 32] for i in range(0, len(images), 32)], ("features", "logits"))


def test_our_metrics_equal_torch_fidelity_calculate_metrics(embedded_source, tmp_path):
    """Same two image sets, same extractor: FID, IS, KID, precision and recall agree with torch-fidelity's
    own `calculate_metrics` reading the same folders."""
    import torch_fidelity

    train = _images(embedded_source, "train")
    fake_dir = _write_folder(tmp_path / "fake", train[:60])
    real_dir = _write_folder(tmp_path / "real", train[60:])
    model, info = build_extractor(RANDCONV)
    artifact, record = _reference(tmp_path / "cache", real_dir, info.identity())
    from nextdetail.stages.evaluate.reference_stats import load_reference

    real_features, real_stats = load_reference(artifact.store, record)
    ours = fidelity_merge.compare(_features(model, train[:60]), real_features, real_stats,
                                  ["fid", "isc", "kid", "prc"], PROTOCOL)
    theirs = torch_fidelity.calculate_metrics(
        input1=str(fake_dir), input2=str(real_dir), feature_extractor=RANDCONV, fid=True, isc=True, kid=True, prc=True,
        isc_splits=4, kid_subsets=20, kid_subset_size=40, cuda=False, cache=False, verbose=False, batch_size=32,
        save_cpu_ram=True)  # no DataLoader worker processes (forked workers and a threaded test process do not mix)
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-4)
    assert ours["isc_mean"] == pytest.approx(theirs["inception_score_mean"], rel=1e-5)
    assert ours["kid_mean"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-4)
    assert ours["precision"] == pytest.approx(theirs["precision"]) and ours["recall"] == pytest.approx(theirs["recall"])
    assert ours["fid"] > 1.0  # two different sets of photos are not "the same"


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_gaussian_noise(embedded_source):
    model, _ = build_extractor(RANDCONV)
    images = _images(embedded_source, "train")
    clean = fidelity.statistics(_features(model, images)["fid"])
    g = torch.Generator().manual_seed(0)
    fids = []
    for sigma in (0, 4, 8, 16, 32, 64):
        noisy = (torch.from_numpy(images).float() + sigma * torch.randn(images.shape, generator=g)).clamp(0, 255)
        fids.append(fidelity.fid(fidelity.statistics(_features(model, noisy.round().byte().numpy())["fid"]), clean))
    assert abs(fids[0]) < 1e-3 and abs(fids[0]) < 0.01 * fids[1]  # ≈ 0: float error of Σ^½ only
    assert all(a < b for a, b in itertools.pairwise(fids)), fids


def test_the_merge_computes_kid_beside_the_other_metrics_and_gets_the_same_row():
    """The merge (issue 40) runs KID's subsets over a pool beside FID, IS and precision / recall, the last with the
    real set's k-NN radii from the reference statistics: with or without a pool, the row is the one torch-fidelity's
    functions give in one call, one thread (`fidelity.compare`) — every value and the keys' order."""
    from concurrent.futures import ThreadPoolExecutor

    from nextdetail.conf.schema import EvalConfig, SampleConfig
    from nextdetail.stages.evaluate.tasks import CheckpointRef, ClassSamples, SamplerFacts, checkpoint_row

    rng = np.random.default_rng(0)
    fake = ClassSamples(np.abs(rng.normal(size=(120, 16))).astype(np.float32),
                        rng.normal(size=(120, 10)).astype(np.float32), {}, np.zeros(0), 1.0)
    real = np.abs(rng.normal(size=(200, 16))).astype(np.float32) + 0.1
    ecfg = EvalConfig(kid_subsets=30, kid_subset_size=50)
    args = (CheckpointRef("last", "x/transformer.pt"), SamplerFacts(1, ["a"], 1e9, False), fake, SampleConfig(),
            ecfg, (real, {**fidelity.statistics(real), "knn": fidelity_merge.knn_radii(real)}))
    with ThreadPoolExecutor(2) as pool:
        beside = checkpoint_row(*args, pool=pool)
    alone = checkpoint_row(*args)
    metrics = fidelity.compare({"fid": fake.fid, "isc": fake.isc}, real, args[-1][1], list(ecfg.metrics),
                               ecfg.protocol())
    assert beside == alone and list(beside) == list(alone)
    assert {k: beside[k] for k in metrics} == {k: round(v, 6) if isinstance(v, float) else v
                                                for k, v in metrics.items()}
    assert [k for k in beside if k in metrics] == list(metrics)  # KID in the middle, where `compare` puts it


def _two_sets(n_fake: int = 150, n_real: int = 220) -> tuple[torch.Tensor, torch.Tensor]:
    """Generated and real features that overlap in part (precision and recall strictly between 0 and 1)."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(n_fake, 24, generator=g) + 0.6, torch.randn(n_real, 24, generator=g)


@pytest.mark.parametrize("save_cpu_ram", [False, True])
@pytest.mark.parametrize("batch", [10000, 37])
def test_precision_recall_from_the_cached_real_radii_equals_torch_fidelity(save_cpu_ram, batch, monkeypatch):
    """The reference statistics keep the real set's k-NN radii (`knn_radii`, k = 1 … KNN_MOST) so that a checkpoint's
    precision / recall no longer recomputes the real × real distances (issue 40). Each radius is torch-fidelity's
    own value, and precision / recall from them equal `prc_features_to_metric`'s exactly, in both of its ways;
    past KNN_MOST the radii are computed as before. With a batch smaller than the sets (37: blocks and column
    batches of uneven ends) the radii and precision / recall, taken one column batch at a time, still equal
    torch-fidelity's whole rows of the same batches."""
    from torch_fidelity.metric_prc import calc_cdist_full, prc_features_to_metric

    monkeypatch.setattr(fidelity_merge, "PRC_BATCH", batch)
    fake, real = _two_sets()
    knn = fidelity_merge.knn_radii(real.numpy())
    assert knn.shape == (len(real), fidelity_merge.KNN_MOST) and knn.dtype == np.float32
    full = calc_cdist_full(real, real, batch)
    for k in range(1, fidelity_merge.KNN_MOST + 1):
        assert torch.equal(torch.from_numpy(knn[:, k - 1]), full.kthvalue(k + 1).values), k
    ours = {}
    for k in (1, 3, fidelity_merge.KNN_MOST, fidelity_merge.KNN_MOST + 2):
        cached = torch.from_numpy(knn[:, k - 1]) if k <= fidelity_merge.KNN_MOST else None
        ours[k] = fidelity_merge.precision_recall(fake, real, k, cached, save_cpu_ram=save_cpu_ram)
        theirs = prc_features_to_metric(fake, real, prc_neighborhood=k, prc_batch_size=batch,
                                        save_cpu_ram=save_cpu_ram, verbose=False)
        assert ours[k] == (theirs["precision"], theirs["recall"]), k
        assert 0 < ours[k][0] < 1 and 0 < ours[k][1] < 1, (k, ours[k])
    wrong = fidelity_merge.precision_recall(fake, real, 3, torch.from_numpy(knn[:, 0]), save_cpu_ram=save_cpu_ram)
    assert wrong[0] < ours[3][0] and wrong[1] == ours[3][1]  # given radii are used: the 1st neighbour's, smaller


def test_reference_tars_are_grouped_in_order_into_tasks_of_about_equal_images():
    """On the cluster a split reference is extracted one task per group of tars (`tar_groups`): every tar once, in
    order, never split; ≈ equal groups of at least `at_least` images where the tars allow, one tar per task where
    they are that large already (ImageNet's), and groups fixed by the tars alone."""
    from nextdetail.stages.evaluate.reference_stats import IMAGES_PER_TASK, tar_groups

    def tars(*sizes: int) -> list[tuple[str, tuple[str, ...]]]:
        return [(f"train/{i:06d}.tar", tuple(f"{i}-{j}" for j in range(n))) for i, n in enumerate(sizes)]

    def images(groups) -> list[int]:
        return [sum(len(keys) for _, keys in group) for group in groups]

    for case, at_least, want in [((150,) * 16, 1000, [1200, 1200]),  # tiny: 16 tasks → 2
                                 ((400,) * 5, 1000, [800, 1200]),
                                 ((1250, 1300) * 4, 1000, [1250, 1300] * 4),  # ImageNet-like: one tar each
                                 ((999,), 1000, [999]),
                                 ((5000, 10, 10, 10), 1000, [5000, 10, 10, 10]),
                                 ((18, 19, 17, 18, 20, 16, 18, 18), 40, [54, 38, 52])]:
        groups = tar_groups(tars(*case), at_least)
        assert [tar for group in groups for tar in group] == tars(*case)  # all, once, in order
        assert images(groups) == want, case
    assert tar_groups(tars(150, 150)) == tar_groups(tars(150, 150), IMAGES_PER_TASK)


def test_kid_over_a_pool_equals_torch_fidelity():
    """KID's subsets in chunks over a thread pool (the merge's longest part, issue 40): the same subsets, the same
    per-subset MMDs in the same order — mean and std equal `kid_features_to_metric`'s exactly, with or without."""
    from concurrent.futures import ThreadPoolExecutor

    from torch_fidelity.metric_kid import kid_features_to_metric

    fake, real = (x.abs() for x in _two_sets())
    theirs = kid_features_to_metric(fake, real, kid_subsets=23, kid_subset_size=60, rng_seed=7, verbose=False)
    with ThreadPoolExecutor(3) as pool:
        pooled = fidelity_merge.kid_subsets(fake, real, 23, 60, 7, pool)()
    alone = fidelity_merge.kid_subsets(fake, real, 23, 60, 7)()
    assert pooled.dtype == np.float64 and np.array_equal(pooled, alone) and len(set(pooled.tolist())) == 23
    assert (float(np.mean(pooled)), float(np.std(pooled))) == (theirs["kernel_inception_distance_mean"],
                                                              theirs["kernel_inception_distance_std"])
    other_seed = fidelity_merge.kid_subsets(fake, real, 23, 60, 8)()
    assert not np.array_equal(other_seed, alone)


@pytest.mark.parametrize("sizes", [(1,), (3, 1, 5), (2, 0, 7)])
def test_class_groups_tars_gather_into_the_bytes_one_writer_streams(sizes, tmp_path):
    """The merge copies each group's members and ends the archive once: byte for byte the tar one process writes
    sample by sample, whatever the grouping (a group may be empty); a truncated group's tar is refused."""
    import io
    import tarfile

    from nextdetail.stages.evaluate.tasks import CheckpointRef, gather_samples_tar
    from nextdetail.storage.shards import ShardTarWriter

    rng = np.random.default_rng(len(sizes))
    samples = [{"__key__": f"{c:04d}-{i:05d}", "png": rng.bytes(int(rng.integers(1500, 3000))), "cls": str(c)}
               for c, n in enumerate(sizes) for i in range(n)]

    def tar_of(rows: list[dict]) -> bytes:
        buf = io.BytesIO()
        writer = ShardTarWriter(buf)
        for row in rows:
            writer.write(row)
        writer.close()
        return buf.getvalue()

    groups, start = [], 0
    for c, n in enumerate(sizes):
        group = tmp_path / "parts" / f"{c:04d}"
        group.mkdir(parents=True)
        (group / "samples.tar").write_bytes(tar_of(samples[start : start + n]))
        groups.append(str(group))
        start += n
    store = Store(str(tmp_path / "out"))
    rel = gather_samples_tar(store, CheckpointRef("step 12", "unused"), groups, {})
    assert rel == "samples/step-12.tar"
    assert (tmp_path / "out" / rel).read_bytes() == tar_of(samples)

    whole = (Path(groups[-1]) / "samples.tar").read_bytes()
    damaged = bytearray(whole)
    with tarfile.open(fileobj=io.BytesIO(whole)) as archive:
        damaged[archive.getmembers()[1].offset + 130] ^= 1  # a digit of its second header's size
    for broken in (whole[:1000], bytes(damaged)):  # truncated inside its first sample; a header's bytes changed
        (Path(groups[-1]) / "samples.tar").write_bytes(broken)
        with pytest.raises(tarfile.ReadError, match=r"samples\.tar: (truncated|damaged)"):
            gather_samples_tar(store, CheckpointRef("step 12", "unused"), groups, {})


@pytest.mark.integration
def test_reference_statistics_are_reused_without_extraction_and_rebuilt_when_data_change(
        embedded_source, tmp_path, monkeypatch):
    calls = []
    real_extract = fidelity.extract
    monkeypatch.setattr(fidelity, "extract", lambda *a, **k: calls.append(1) or real_extract(*a, **k))
    folder = _write_folder(tmp_path / "ref", _images(embedded_source, "val"))
    extractor = build_extractor(RANDCONV)[1].identity()
    first, record = _reference(tmp_path / "cache", folder, extractor)
    assert record["work"] == "ran" and len(calls) == 1
    stats_file = Path(first.store.path(record["summary"]["file"]))
    mtime = stats_file.stat().st_mtime_ns
    again, record2 = _reference(tmp_path / "cache", folder, extractor)
    assert again.identity == first.identity and record2["work"] == "reused"
    assert len(calls) == 1 and stats_file.stat().st_mtime_ns == mtime  # no extraction, nothing rewritten
    # a damaged statistics file (same size) is detected by its sha256 and rebuilt
    data = bytearray(stats_file.read_bytes())
    data[-100] ^= 0xFF
    stats_file.write_bytes(bytes(data))
    _, rebuilt = _reference(tmp_path / "cache", folder, extractor)
    assert rebuilt["work"] == "ran" and len(calls) == 2
    # one changed reference image → another identity, computed afresh
    a = np.asarray(Image.open(folder / "00003.png")).copy()
    a[:4] = 255 - a[:4]
    Image.fromarray(a).save(folder / "00003.png")
    changed, record3 = _reference(tmp_path / "cache", folder, extractor)
    assert changed.identity != first.identity and record3["work"] == "ran" and len(calls) == 3


@pytest.mark.integration
def test_reference_statistics_are_shared_through_an_s3_bucket(s3_endpoint, embedded_source, tmp_path, monkeypatch):
    options = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    folder = _write_folder(tmp_path / "ref", _images(embedded_source, "val"))
    spec = reference_spec(str(folder), "", "", "png", {}, None)
    extractor = build_extractor(RANDCONV)[1].identity()
    bucket = Store("s3://team-bucket/nd", options)

    def user() -> tuple:
        artifact = plan_reference(bucket, spec, extractor)
        return artifact, ensure_reference(artifact, spec, RANDCONV, None, str(tmp_path / "w"), 32, "cpu",
                                          log=lambda _: None)

    first, record = user()
    assert record["work"] == "ran" and first.store.url().startswith("s3://team-bucket/nd/refstats/")
    calls = []
    monkeypatch.setattr(fidelity, "extract", lambda *a, **k: calls.append(1))
    _, record2 = user()  # a teammate: same inputs, same identity, reused from the bucket
    assert record2["work"] == "reused" and not calls
    from nextdetail.stages.evaluate.reference_stats import load_reference

    features, stats = load_reference(first.store, record2)
    assert features.shape == (24, 512) and stats["sigma"].shape == (512, 512)


def test_inception_without_weights_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match=r"no such file.*download .*weights-inception-2015-12-05.*eval\.inception_weights"):
        build_extractor(INCEPTION, str(tmp_path / "missing.pth"))
    bogus = tmp_path / "bogus.pth"
    torch.save({"fc.weight": torch.zeros(1)}, bogus)
    with pytest.raises(UserError, match="not Inception-v3-compat weights"):
        build_extractor(INCEPTION, str(bogus))


@pytest.mark.e2e
def test_evaluate_stage_metrics_report_pictures_and_caching(pipeline, embedded_source):
    root, cfg, results = pipeline
    ev = results["evaluate"]
    out = Path(ev.url)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["extractor"]["name"] == RANDCONV and metrics["extractor"]["comparable_with_published"] is False
    assert metrics["reference"]["identity"] == ev.reference["identity"] and metrics["reference"]["images"] == 144
    assert metrics["sampling"]["seed"] == cfg.eval.seed and metrics["sampling"]["samples_per_class"] == 3
    assert metrics["what"]["train_ar_identity"] == results["train_ar"].identity
    rows = metrics["checkpoints"]
    assert [r["step"] for r in rows] == [4, 8, 12] and all(r["samples"] == 36 for r in rows)
    for r in rows:
        assert r["fid"] > 0 and 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 and r["isc_mean"] >= 1
        assert Path(r["checkpoint"]).is_file()
    tok = metrics["tokenizer"]
    assert tok["images"] == 24 and tok["rfid"] > 0 and 5 < tok["psnr"] < 60
    report = (out / "report.md").read_text().splitlines()
    assert report[0].startswith("# Evaluation of") and report[2].startswith("**Evaluated**")
    assert "not comparable with published" in "\n".join(report[:8]).lower()
    assert "![samples](grid.png)" in report and "![curves](curves.png)" in report
    for name in ("grid.png", "curves.png", "samples/step-12.tar"):
        assert (out / name).is_file(), name
    assert len(list((out / "grids").glob("*.png"))) == 12
    import webdataset as wds

    samples = list(wds.WebDataset(str(out / "samples/step-12.tar"), shardshuffle=False).decode("rgb"))
    assert len(samples) == 36 and samples[0]["png"].shape == (32, 32, 3)
    # unchanged: nothing runs; a sampling seed: evaluate re-runs, training and the reference stay
    from nextdetail.pipeline.run import run_pipeline

    again = run_pipeline(make_config(root, embedded_source, *FAST), until="evaluate", progress=False)
    assert again.work == dict.fromkeys(again, "up to date") and again["evaluate"].url == ev.url
    reseeded = run_pipeline(make_config(root, embedded_source, *FAST, "eval.seed=1"), until="evaluate", progress=False)
    assert reseeded["train_ar"].work == "up to date" and reseeded["evaluate"].work == "ran"
    assert reseeded["evaluate"].reference["work"] in {"cached", "reused"}
    assert reseeded["evaluate"].url != ev.url
    regridded = run_pipeline(make_config(root, embedded_source, *FAST, "sample.per_class=3"), until="evaluate",
                             progress=False)  # the sample stage's own count: evaluation does not depend on it
    assert regridded["sample"].work == "ran" and regridded["evaluate"].work == "up to date"


@pytest.mark.e2e
def test_eval_cli_on_checkpoint_files_with_a_folder_reference(pipeline, embedded_source, tmp_path):
    nextdetail = str(Path(sys.executable).parent / "nextdetail")
    root, _, results = pipeline
    folder = _write_folder(tmp_path / "ref", _images(embedded_source, "train")[:50])
    out = tmp_path / "eval-out"
    ar = results["train_ar"]
    proc = run_cli([nextdetail, "eval", "--ckpt", f"{ar.url}/transformer.pt", "--ckpt", f"{ar.url}/best.pt",
                    "--reference", str(folder), "--n", "2", "--extractor", RANDCONV, "--out", str(out), "--no-progress",
                    "-o", f"storage.root={root}"])
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["checkpoints"]) == 2 and metrics["reference"]["images"] == 50
    assert (out / "report.md").is_file() and (out / "curves.png").is_file() and (out / "_COMPLETE.json").is_file()
    bad = run_cli([nextdetail, "eval", "--ckpt", f"{ar.url}/transformer.pt", "--reference", str(folder),
                   "--extractor", INCEPTION, "-o", f"eval.inception_weights={tmp_path / 'none.pth'}",
                   "-o", f"storage.root={root}", "--out", str(out)])
    assert bad.returncode == 2 and "eval.inception_weights" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.e2e
def test_evaluate_by_class_groups_on_two_workers_equals_one_worker(own_pipeline, embedded_source, tmp_path,
                                                                   monkeypatch):
    """eval.resources: every checkpoint × class group is a task on the workers offering them (a `dask worker
    --resources GPU=1` each); the features are gathered in class order and the metrics computed once. Two workers
    give exactly one worker's metrics and samples tar, as do a group size that does not divide the classes and the
    pipeline's own evaluation in one process. The reference statistics are extracted one task per group of tars
    and gathered: the same arrays as one process's."""
    import shutil
    import sys

    from distributed import Client
    from helpers import external_dask

    from nextdetail.pipeline.run import run_stage
    from nextdetail.pipeline.runtime import prefect_api
    from nextdetail.stages.evaluate import reference_stats

    # the 144 train images' 8 tars in 3 groups (not 1 of ≥ 1,000 images), so the gather's order is exercised
    monkeypatch.setattr(reference_stats, "IMAGES_PER_TASK", 40)

    root, _, results = own_pipeline
    up = {k: results[k] for k in ("shard", "train_tokenizer", "tokenize", "train_ar")}
    runs: list[int] = []

    def evaluate(address: str, per_task: int) -> tuple[dict, bytes, dict]:
        refs = tmp_path / f"refstats-{per_task}-{len(runs)}"  # empty: the reference statistics are computed too
        c = make_config(root, embedded_source, *FAST, f"dask.address={address}", "eval.resources={GPU: 1}",
                        f"eval.classes_per_task={per_task}", f"eval.reference_cache={refs}")
        with prefect_api():
            ev = run_stage(c, "evaluate", up, progress=False)
        assert ev.work == "ran" and ev.identity == results["evaluate"].identity  # where it runs is not what it is
        assert ev.reference["work"] == "ran" and ev.reference["identity"] == results["evaluate"].reference["identity"]
        assert not list(refs.glob("refstats/*/parts"))  # one task per group of tars, gathered
        # the statistics are the ones one process computed for the pipeline
        mine, theirs = (np.load(next(Path(r["url"]).glob("stats-*.npz"))) for r in (ev.reference,
                                                                                    results["evaluate"].reference))
        for k in ("features", "mu", "sigma", "knn"):
            np.testing.assert_array_equal(mine[k], theirs[k])
        runs.append(1)
        out = Path(ev.url)
        metrics, tar = json.loads((out / "metrics.json").read_text()), (out / "samples/step-12.tar").read_bytes()
        assert not (out / "parts").exists()  # the groups' copies are gone once merged
        with Client(address, timeout=60) as client:
            loads = client.run(lambda: getattr(sys.modules.get("nextdetail.stages.evaluate.tasks"), "LOADS", 0))
        shutil.rmtree(out)  # the next run evaluates again (same identity)
        return metrics, tar, loads

    here = json.loads(Path(results["evaluate"].url, "metrics.json").read_text())
    here_tar = Path(results["evaluate"].url, "samples/step-12.tar").read_bytes()
    shutil.rmtree(results["evaluate"].url)
    with external_dask(("a", ["--resources", "GPU=1"])) as address:
        one, one_tar, _ = evaluate(address, 5)
    with external_dask(("a", ["--resources", "GPU=1"]), ("b", ["--resources", "GPU=1"])) as address:
        two, two_tar, loads = evaluate(address, 5)
    assert len(loads) == 2 and all(n >= 1 for n in loads.values()), loads  # both workers sampled
    metric_keys = ("fid", "isc_mean", "kid_mean", "precision", "recall", "samples", "step")
    rows = [[{k: r[k] for k in metric_keys} for r in m["checkpoints"]] for m in (one, two)]
    assert rows[0] == rows[1] and len(rows[0]) == 3 and rows[0][-1]["samples"] == 36
    assert one_tar == two_tar
    # and the same images as the one process of the session's pipeline (no cluster), so the same metrics up to the
    # features' float sums: that process extracts with all cores' threads, a worker with one (summation order;
    # seen: FID 109.827806 vs 109.827807)
    assert here_tar == one_tar
    assert [{k: pytest.approx(r[k], rel=1e-5) for k in metric_keys} for r in here["checkpoints"]] == rows[0]
    with external_dask(("a", ["--resources", "GPU=1"]), ("b", ["--resources", "GPU=1"])) as address:
        regrouped, regrouped_tar, _ = evaluate(address, 12)
    assert [{k: r[k] for k in metric_keys} for r in regrouped["checkpoints"]] == rows[0] and regrouped_tar == one_tar
