"""NDP: quadtree states, mixed-scale decoding, the masked model, budgeted sampling, and the stage."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nextdetail.models.ndp import NDPConfig, NextDetailMaskedTransformer, child_targets, leaf_inputs, ndp_loss
from nextdetail.models.ndp_sampler import ESTIMATORS, NDPSampler
from nextdetail.models.quadtree import Quadtree, children, dyadic_sides, pack, slot_offsets
from nextdetail.models.tokenizer import BaseDetailVQVAE, TokenizerSpec

SIDES = (1, 2, 4, 8)
SPEC = TokenizerSpec(vocab_size=64, z_channels=8, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, resolution=32,
                     patch_nums=SIDES, order=0, using_sa=False, using_mid_sa=False)


@pytest.fixture(scope="module")
def tokenizer() -> BaseDetailVQVAE:
    torch.manual_seed(0)
    return BaseDetailVQVAE(SPEC).eval()


def _model() -> NextDetailMaskedTransformer:
    torch.manual_seed(0)
    model = NextDetailMaskedTransformer(NDPConfig(latent_side=8, vocab_size=64, cvae=8, num_classes=5, depth=2,
                                                  width=64, heads=4))
    for block in model.blocks:  # away from the zero-initialised gates, so every path carries signal
        torch.nn.init.normal_(block.ada_lin[-1].weight, std=0.05)
    return model.eval()


def _pyramid(batch: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (batch, s, s), generator=g) for s in SIDES]


def test_children_of_a_leaf_are_exactly_its_four_quadrants_at_the_next_scale():
    maps = _pyramid(2)
    targets = child_targets(maps)  # (B, L, 4)
    offsets = slot_offsets(SIDES)
    for k, s in enumerate(SIDES[:-1]):
        for i, j in itertools.product(range(s), range(s)):
            kids = children(k, i, j)
            assert sorted(kids) == [(k + 1, 2 * i + di, 2 * j + dj) for di in (0, 1) for dj in (0, 1)]
            expected = torch.stack([maps[k + 1][:, y, x] for _, y, x in kids], dim=1)  # (B, 4)
            assert torch.equal(targets[:, offsets[k] + i * s + j], expected)
            # refining the node replaces exactly its region by level-(k+1) leaves
            tree = Quadtree.full(1, SIDES)
            tree.refined = [r.clone() for r in tree.refined]
            for kk in range(k, len(SIDES) - 1):  # make (k, i, j) a leaf: un-refine it and everything below
                f = 2 ** (kk - k)
                tree.refined[kk][0, i * f:(i + 1) * f, j * f:(j + 1) * f] = False
            before = tree.level_map()[0].clone()
            where = torch.zeros(1, s, s, dtype=torch.bool)
            where[0, i, j] = True
            tree.refine(k, where)
            region = torch.zeros(8, 8, dtype=torch.bool)
            f = 8 // s
            region[i * f:(i + 1) * f, j * f:(j + 1) * f] = True
            after = tree.level_map()[0]
            assert (after[region] == k + 1).all() and (before[region] == k).all()
            assert torch.equal(after[~region], before[~region])


def test_quadtree_invariants_for_random_states():
    g = torch.Generator().manual_seed(1)
    tree = Quadtree.random(torch.rand(64, generator=g), SIDES, g)
    level = tree.level_map()
    for b in range(64):  # every latent cell lies in exactly one leaf, of the level level_map says
        cover = torch.zeros(8, 8, dtype=torch.long)
        for k, s in enumerate(SIDES):
            cover += tree.leaves(k)[b].long().repeat_interleave(8 // s, 0).repeat_interleave(8 // s, 1)
            assert torch.equal(tree.leaves(k)[b].repeat_interleave(8 // s, 0).repeat_interleave(8 // s, 1),
                               level[b] == k)
        assert (cover == 1).all()
    assert int(tree.leaf_slots().sum(1).min()) >= 1
    assert torch.equal(tree.leaf_slots().sum(1), 1 + 3 * tree.n_refined())  # each refinement: one leaf → four
    slot, valid = pack(tree.leaf_slots())
    assert torch.equal(valid.sum(1), tree.leaf_slots().sum(1))
    assert (tree.leaf_slots().gather(1, slot) | ~valid).all()
    with pytest.raises(ValueError, match="power-of-two"):
        dyadic_sides(12)


def test_mixed_scale_decoder_returns_a_full_size_image_for_any_quadtree(tokenizer):
    maps = _pyramid(6, seed=2)
    g = torch.Generator().manual_seed(3)
    full = tokenizer.indices_to_img(maps)
    states = [Quadtree.root(6, SIDES), Quadtree.full(6, SIDES),
              Quadtree.random(torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9, 1.0]), SIDES, g)]
    for tree in states:
        images = tokenizer.indices_to_img_mixed(maps, tree.present())
        assert images.shape == (6, 3, 32, 32) and torch.isfinite(images).all()
        # tokens the state does not hold are never read: scrambling them changes nothing
        scrambled = [torch.where(p, m, torch.randint_like(m, 64)) for m, p in zip(maps, tree.present(), strict=True)]
        assert torch.equal(tokenizer.indices_to_img_mixed(scrambled, tree.present()), images)
    assert torch.equal(tokenizer.indices_to_img_mixed(maps, states[1].present()), full)  # full state = Algorithm 2
    assert not torch.allclose(tokenizer.indices_to_img_mixed(maps, states[0].present()), full, atol=1e-3)


def test_the_model_sees_leaves_only_and_the_root_comes_from_the_class_alone(tokenizer):
    model = _model()
    maps = _pyramid(3, seed=4)
    g = torch.Generator().manual_seed(5)
    tree = Quadtree.random(torch.tensor([0.2, 0.6, 1.0]), SIDES, g)
    f, slot, valid = leaf_inputs(tokenizer.quantize, maps, tree)
    labels = torch.tensor([0, 1, 2])
    out = model(labels, f, slot, valid, drop_labels=False)
    assert out.children.shape == (3, slot.shape[1], 4, 64) and out.difficulty.shape == slot.shape
    for b in range(3):  # alone, without the batch's padding, each image gets the same outputs
        n = int(valid[b].sum())
        alone = model(labels[b:b + 1], f[b:b + 1, :n], slot[b:b + 1, :n], valid[b:b + 1, :n], drop_labels=False)
        assert torch.allclose(alone.children[0], out.children[b, :n], atol=1e-5)
        assert torch.allclose(alone.root[0], out.root[b], atol=1e-5)
    empty = model(labels, f[:, :0], slot[:, :0], valid[:, :0], drop_labels=False)
    assert torch.allclose(empty.root, out.root, atol=1e-5)  # the root does not see the leaves
    loss, _ = ndp_loss(model, model, tokenizer.quantize, torch.cat([m.flatten(1) for m in maps], 1), labels)
    loss.backward()
    assert torch.isfinite(loss) and model.difficulty_head.weight.grad.abs().sum() > 0
    assert model.head.weight.grad.abs().sum() > 0 and model.root_head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_refinements_never_exceed_the_budget_and_full_budget_is_full_refinement(tokenizer, estimator):
    sampler = NDPSampler(_model(), tokenizer, estimator=estimator, refine_per_step=3)
    labels = torch.tensor([0, 1, 2, 3])
    previous = None
    for budget in (0.1, 0.25, 0.5, 0.75, 1.0):
        out = sampler.sample(labels, cfg=1.5, generator=torch.Generator().manual_seed(0), budget=budget)
        allowed = sampler.refinements(budget)
        assert (out.refined <= allowed).all() and torch.equal(out.refined, out.tree.n_refined())
        assert (out.refined == allowed).all()  # and the budget is spent
        assert out.images.shape == (4, 3, 32, 32)
        if previous is not None:
            assert (out.flops > previous).all()  # more budget, more compute
        previous = out.flops
    assert out.tree.is_full().all() and (out.level_maps == 3).all()
    assert torch.allclose(out.images, tokenizer.indices_to_img(out.maps), atol=1e-6)


def test_full_budget_reproduces_full_refinement_token_for_token(tokenizer):
    """Budget 100 %: every estimator and every step size end at the full pyramid; with one class and seed,
    breadth-first refinement in steps of a whole level draws VAR's order and the same tokens each time."""
    sampler = NDPSampler(_model(), tokenizer, budget=1.0, estimator="uniform", refine_per_step=64)
    labels = torch.tensor([1, 4])
    a = sampler.sample(labels, 1.0, generator=torch.Generator().manual_seed(9))
    b = sampler.sample(labels, 1.0, generator=torch.Generator().manual_seed(9))
    assert all(torch.equal(x, y) for x, y in zip(a.maps, b.maps, strict=True))
    assert (a.forward_passes == len(SIDES)).all()  # one pass per level, like VAR's one per map
    assert a.tree.is_full().all()


def test_uniform_refines_breadth_first_and_learned_picks_the_highest_difficulty(tokenizer):
    sampler = NDPSampler(_model(), tokenizer, estimator="uniform", refine_per_step=1)
    out = sampler.sample(torch.tensor([0, 2]), generator=torch.Generator().manual_seed(0), budget=5 / 21)
    assert out.tree.refined[0].all() and out.tree.refined[1].all() and not out.tree.refined[2].any()
    # learned: the first refinement after the root's is the child the difficulty head ranks first
    model = _model()
    sampler = NDPSampler(model, tokenizer, estimator="learned", refine_per_step=1)
    out = sampler.sample(torch.tensor([3]), generator=torch.Generator().manual_seed(0), budget=2 / 21)
    root_only = Quadtree.root(1, SIDES)
    root_only.refine(0, torch.ones(1, 1, 1, dtype=torch.bool))
    f, slot, valid = leaf_inputs(tokenizer.quantize, out.maps, root_only)
    diff = model(torch.tensor([3, 5]), f.repeat(2, 1, 1), slot.repeat(2, 1), valid.repeat(2, 1),
                 drop_labels=False).difficulty[0]
    best = int(slot[0, diff.argmax()]) - slot_offsets(SIDES)[1]
    assert out.tree.refined[1][0].flatten().nonzero().flatten().tolist() == [best]


# ---- the stage, on the embedded dataset --------------------------------------------------------


NDP = ("ar.model=ndp", "tokenizer.order=0", "tokenizer.truncation=0.5", "ar.steps=60", "ar.checkpoint_every=30",
       "ar.base_lr=2e-3", "ar.warmup_steps=5", "sample.budget=0.5", "sample.refine_per_step=4",
       "tokenizer.decay=constant")  # as `--model ndp` on tiny (its `models: ndp:` section)


@pytest.fixture(scope="module")
def ndp_pipeline(pipeline, embedded_source):
    """NDP's branch beside the session's CART pipeline, in its root: the shards are the same artifact."""
    from helpers import FAST, make_config

    from nextdetail.pipeline.run import run_pipeline

    root = pipeline[0]
    cfg = make_config(root, embedded_source, *FAST, *NDP)
    return root, cfg, run_pipeline(cfg, until="evaluate", progress=False)


@pytest.mark.e2e
def test_difficulty_head_ranks_held_out_patches_like_its_target(ndp_pipeline):
    """On held-out images, the learned difficulty of every refinable leaf (random states) correlates
    positively with the error that refining it removes (Spearman over all leaves)."""
    from scipy.stats import spearmanr

    from nextdetail.models.ndp import difficulty_target, refinement_error
    from nextdetail.stages.train_ar.tasks import load_transformer
    from nextdetail.storage.tokens import TokenCache

    _, _, results = ndp_pipeline
    model, _ = load_transformer(f"{results['train_ar'].url}/transformer.pt")
    tokenizer = BaseDetailVQVAE.from_checkpoint(f"{results['train_tokenizer'].url}/tokenizer.pt")
    cache = TokenCache(results["tokenize"].url)
    idx = cache.index().to_pydict()
    val = sorted((t, r, c) for split, t, r, c in zip(idx["split"], idx["shard"], idx["row"], idx["class_index"],
                                                     strict=True) if split == "val")
    tars = sorted({t for t, _, _ in val})
    tokens = torch.cat([torch.from_numpy(np.asarray(cache.read("val", t), dtype=np.int64)).flatten(0, 1)
                        for t in tars])  # (images · variants, L): both flips
    labels = torch.tensor([c for _, _, c in val]).repeat_interleave(2)
    tokens, labels = tokens.repeat(4, 1), labels.repeat(4)  # four random states of each
    maps = [x.view(len(tokens), s, s) for x, s in zip(tokens.split([s * s for s in SIDES], 1), SIDES, strict=True)]
    tree = Quadtree.random(torch.rand(len(tokens), generator=torch.Generator().manual_seed(0)), SIDES,
                           torch.Generator().manual_seed(1))
    with torch.no_grad():
        f, slot, valid = leaf_inputs(tokenizer.quantize, maps, tree)
        predicted = model(labels, f, slot, valid, drop_labels=False).difficulty
    target = difficulty_target(refinement_error(tokenizer.quantize, maps, SIDES)).gather(1, slot)
    refinable = valid & (model.slot_level[slot] < len(SIDES) - 1)
    rho = spearmanr(predicted[refinable].numpy(), target[refinable].numpy()).statistic
    level = model.slot_level[slot]
    at2 = refinable & (level == 2)  # within one level too: not just "coarser leaves hide more error"
    rho2 = spearmanr(predicted[at2].numpy(), target[at2].numpy()).statistic
    print(f"held-out Spearman: all refinable leaves {rho:.3f} ({int(refinable.sum())}), level 2 {rho2:.3f} ({int(at2.sum())})")
    assert refinable.sum() > 300 and rho > 0.3 and rho2 > 0, (rho, rho2)


@pytest.mark.e2e
def test_ndp_stage_outputs_budgeted_samples_a_heat_map_and_compute(ndp_pipeline, embedded_source):
    from helpers import FAST, make_config

    from nextdetail.pipeline.run import run_pipeline

    root, _, results = ndp_pipeline
    sample = results["sample"]
    s = sample.summary
    assert s["model"] == "ndp" and s["budget"] == 0.5 and s["gflops_per_image"] > 0
    for name in ("grid.png", "heatmap.png", "samples.tar"):
        assert (Path(sample.url) / name).stat().st_size > 0
    metrics = json.loads((Path(results["evaluate"].url) / "metrics.json").read_text())
    assert metrics["checkpoints"][-1]["fid"] > 0 and metrics["checkpoints"][-1]["gflops_per_image"] > 0
    # the dial is a sampling knob: a new budget re-samples and re-evaluates, and trains nothing
    again = run_pipeline(make_config(root, embedded_source, *FAST, *NDP, "sample.budget=1.0"), until="evaluate",
                         progress=False)
    assert again["train_ar"].work == "up to date" and again["tokenize"].work == "up to date"
    assert again["sample"].identity != sample.identity and again["evaluate"].identity != results["evaluate"].identity
    assert again["sample"].summary["gflops_per_image"] > s["gflops_per_image"]


@pytest.mark.e2e
def test_cart_and_ndp_in_one_run_share_the_shards_and_only_cart_decomposes(ndp_pipeline, embedded_source):
    """`run --model cart,ndp` in the root holding the session's CART pipeline and NDP's branch: two branches in one
    flow. The dry run says what each will do; the run reuses the shared shards (one run-log row naming both
    models), skips NDP's up-to-date branch (its decompose "not needed": NDP's order-0 tokenizer reads images
    alone), trains CART with this run's settings on its up-to-date decomposition and tokens, and prints the models
    side by side; status then calls everything up to date (NDP's decompose: not needed)."""
    import sys

    from helpers import FAST, cli_config, run_cli

    from nextdetail.storage.fs import Store
    from nextdetail.storage.lineage import Lineage

    root, _, ndp = ndp_pipeline
    assert ndp.work["decompose"] == "not needed" and "decompose" not in ndp.identities  # order 0: no factors at all
    record = Lineage(Store(str(root))).read("train_tokenizer", ndp.identities["train_tokenizer"])
    assert set(record["upstream"]) == {"shard"}
    rest = [o for o in NDP if o.split("=")[0] not in ("ar.model", "tokenizer.order", "tokenizer.truncation",
                                                       "tokenizer.decay")]  # what `--model ndp` sets
    cmd = [sys.executable, "-m", "nextdetail.cli", "run", "--model", "cart,ndp", "--until", "evaluate",
           "--no-progress", *cli_config(root, embedded_source, *FAST, *rest)]
    dry = run_cli([*cmd, "--dry-run"])
    assert dry.returncode == 0, dry.stderr[-2000:]
    cart_part, ndp_part = dry.stdout.split("model ndp:")
    assert "train_tokenizer  skip (up to date)" in cart_part and "train_ar         run (stale)" in cart_part
    assert "shard            skip (up to date)" in cart_part and "decompose        skip (up to date)" in cart_part
    assert "shard            the same artifact as model cart's" in ndp_part
    assert "decompose        skip (not needed by this config)" in ndp_part
    assert "train_ar         skip (up to date)" in ndp_part and "run (" not in ndp_part

    done = run_cli(cmd)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "── model cart" in out and "── model ndp" in out and "models side by side" in out
    assert "decompose: not needed by this config" in out.split("── model ndp")[1]
    runs = Lineage(Store(str(root))).runs().to_pylist()
    this_run = [r for r in runs if r["run_id"] == runs[-1]["run_id"]]
    by_stage = {}
    for r in this_run:
        by_stage.setdefault(r["stage"], []).append(r)
    assert [(r["model"], r["work"]) for r in by_stage["shard"]] == [("cart,ndp", "up to date")]
    assert [(r["model"], r["work"]) for r in by_stage["decompose"]] == [("cart", "up to date")]
    assert sorted((r["model"], r["work"]) for r in by_stage["train_ar"]) == [("cart", "ran"), ("ndp", "up to date")]
    ndp_eval = next(r for r in by_stage["evaluate"] if r["model"] == "ndp")
    assert ndp_eval["url"] == ndp["evaluate"].url
    table = out[out.index("models side by side"):].splitlines()
    fid = {line.split()[0]: float(line.split()[1]) for line in table[2:4]}
    assert set(fid) == {"cart", "ndp"} and all(v > 0 for v in fid.values())

    status = run_cli([sys.executable, "-m", "nextdetail.cli", "status", "--model", "cart,ndp", "--json",
                      *cli_config(root, embedded_source, *FAST, *rest)])
    assert status.returncode == 0, status.stderr[-2000:]
    rows = json.loads(status.stdout)
    assert {(r["model"], r["state"]) for r in rows} == {("cart", "up to date"), ("ndp", "up to date"),
                                                         ("ndp", "not needed")}
    assert {r["stage"] for r in rows if r["model"] == "ndp" and r["state"] == "not needed"} == {"decompose"}
    assert {r["stage"] for r in rows if r["shared_with"] == "cart"} == {"shard"}


@pytest.mark.e2e
def test_sample_cli_model_ndp_budget_writes_grid_and_heat_map(ndp_pipeline, tmp_path):
    import sys

    from helpers import run_cli

    _, _, results = ndp_pipeline
    ckpt = f"{results['train_ar'].url}/transformer.pt"
    out = tmp_path / "s"
    done = run_cli([sys.executable, "-m", "nextdetail.cli", "sample", "--model", "ndp", "--budget", "0.3",
                    "--estimator", "entropy", "--ckpt", ckpt, "--out", str(out), "--n", "2", "--classes", "0", "1",
                    "--no-progress"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "grid.png").stat().st_size > 0 and (out / "heatmap.png").stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["budget"] == 0.3 and summary["estimator"] == "entropy" and "NDP budget 30%" in done.stdout


def test_each_models_sampling_identity_ignores_the_other_models_dial():
    from nextdetail.conf.schema import SampleConfig

    a, b = SampleConfig(), SampleConfig(budget=0.3, estimator="random")
    assert a.identity_settings("cart") == b.identity_settings("cart")
    assert a.identity_settings("ndp") != b.identity_settings("ndp")
    c = SampleConfig(detail_budget=0.5, upscale=4)
    assert a.identity_settings("ndp") == c.identity_settings("ndp")
    assert a.identity_settings("cart") != c.identity_settings("cart")


# ---- CART's detail dial ------------------------------------------------------------------------


def _cart(order: int = 2):
    from nextdetail.models.transformer import NextDetailTransformer, TransformerConfig

    spec = TokenizerSpec(vocab_size=32, z_channels=8, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, resolution=32,
                         patch_nums=SIDES, order=order, using_sa=False, using_mid_sa=False)
    torch.manual_seed(0)
    tok = BaseDetailVQVAE(spec).eval()
    sides = tuple(m.side for m in tok.schedule)
    model = NextDetailTransformer(TransformerConfig(sides=sides, vocab_size=32, cvae=8, num_classes=5, depth=2,
                                                    width=64, heads=4, n_base=len(SIDES))).eval()
    for block in model.blocks:
        torch.nn.init.normal_(block.ada_lin[-1].weight, std=0.05)
    return model, tok


def test_detail_dial_keeping_every_position_is_the_standard_sampler():
    from nextdetail.models.quant import NextInput

    model, tok = _cart()
    labels = torch.tensor([0, 3])
    runs = []
    for dial in (None, lambda d: torch.ones(d.shape[0], 64, dtype=torch.bool)):  # selection path, nothing dropped
        runs.append(model.sample(labels, NextInput(tok.quantize, 8), 1.5, 5, 0.9, torch.Generator().manual_seed(2),
                                 select_details=dial))
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_detail_dial_predicts_details_only_in_the_hardest_patches():
    from nextdetail.models.sampler import CARTSampler

    model, tok = _cart()
    labels = torch.tensor([0, 1, 2])
    full = CARTSampler(model, tok).sample(labels, 1.5, generator=torch.Generator().manual_seed(0))
    flops = CARTSampler(model, tok).flops_per_image
    for budget in (0.25, 0.5):
        sampler = CARTSampler(model, tok, detail_budget=budget, detail_patch=2)
        out = sampler.sample(labels, 1.5, generator=torch.Generator().manual_seed(0))
        assert (out.detail_keep.flatten(1).sum(1) == round(budget * 16) * 4).all()  # kept patches × 2×2 cells
        assert all(torch.equal(a, b) for a, b in zip(full.maps[:4], out.maps[:4], strict=True))  # the base: as before
        assert all((m[~out.detail_keep] == 0).all() for m in out.maps[4:])  # no detail outside the kept patches
        assert out.images.shape == (3, 3, 32, 32) and sampler.flops_per_image < flops
        # the kept patches are those of the highest predicted detail energy
        with torch.no_grad():
            from nextdetail.models.quant import NextInput

            step, x = NextInput(tok.quantize, 8), None
            for k in range(3):
                f = step(k, out.maps[k])
                x = f if x is None else torch.cat((x, f), 1)
            _, feats = model(labels, x, drop_labels=False, return_features=True)
            bg, ed = model.begin_ends[3]
            score = torch.nn.functional.avg_pool2d(model.detail_difficulty(feats[:, bg:ed]).exp().view(3, 1, 8, 8), 2)
        top = score.flatten(1).topk(round(budget * 16), dim=1).indices
        assert torch.equal(out.detail_keep[:, ::2, ::2].flatten(1).nonzero()[:, 1].view(3, -1), top.sort(1).values)
    assert torch.allclose(CARTSampler(model, tok, detail_budget=1.0).sample(
        labels, 1.5, generator=torch.Generator().manual_seed(0)).images, full.images)


@pytest.mark.e2e
def test_cart_detail_dial_is_a_sampling_knob_of_a_trained_cart_model(pipeline, embedded_source):
    """The pipeline's CART transformer carries the dial's head (trained on detached features, so CART's
    own training is unchanged); `sample.detail_budget` re-samples with fewer FLOPs and retrains nothing.
    (How well the head ranks needs a tokenizer trained longer than this fixture's: benchmarks/ndp_curve.py.)"""
    from helpers import FAST, make_config

    from nextdetail.pipeline.run import run_pipeline
    from nextdetail.stages.train_ar.tasks import load_transformer

    root, _, results = pipeline
    model, _ = load_transformer(f"{results['train_ar'].url}/transformer.pt")
    assert model.detail_head is not None and model.cfg.n_base == 4
    dial = run_pipeline(make_config(root, embedded_source, *FAST, "sample.detail_budget=0.5"), until="sample",
                        progress=False)
    assert dial["train_ar"].work == "up to date" and dial["sample"].identity != results["sample"].identity
    assert dial["sample"].summary["detail_budget"] == 0.5
    assert dial["sample"].summary["gflops_per_image"] < results["sample"].summary.get("gflops_per_image", float("inf"))
