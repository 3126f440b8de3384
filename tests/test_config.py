import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from nextdetail.conf import available_presets, load_config
from nextdetail.errors import UserError

NEXTDETAIL = str(Path(sys.executable).parent / "nextdetail")


@pytest.mark.parametrize("preset", ["tiny", "imagenet256", "imagenet512", "var-d16-imagenet256"])
def test_presets_validate(preset):
    from nextdetail.models.tokenizer import TokenizerSpec
    cfg = load_config(preset)
    assert cfg.preset == preset
    spec = TokenizerSpec.from_config(cfg)
    assert spec.latent_side * spec.downsample == cfg.shard.resolution
    # the token maps: base scales ending at the latent side, then full-resolution detail maps (ImageNet: VAR's
    # 10 scales + 3 details; the paper's 14th map is issue 27's global-residual reading)
    assert cfg.tokenizer.patch_nums[-1] == spec.latent_side
    maps = {"tiny": 7, "imagenet256": 13, "imagenet512": 13, "var-d16-imagenet256": 10}[preset]
    assert len(spec.patch_nums) + spec.order * spec.detail_depth == maps


def test_the_var_preset_is_vars_released_models_under_vars_protocol():
    from nextdetail.models.configs import TokenizerSpec
    from nextdetail.stages import REGISTRY

    cfg = load_config("var-d16-imagenet256")
    assert TokenizerSpec.from_config(cfg) == TokenizerSpec()  # vae_ch160v4096z32 at 256 px
    assert cfg.tokenizer.pretrained.endswith("vae_ch160v4096z32.pth") and cfg.ar.pretrained.endswith("var_d16.pth")
    assert (cfg.ar.model, cfg.ar.depth, cfg.tokenizer_order) == ("cart", 16, 0)
    assert (cfg.sample.cfg, cfg.sample.top_k, cfg.sample.top_p, cfg.eval.samples_per_class) == (1.5, 900, 0.96, 50)
    assert cfg.eval.reference.endswith("VIRTUAL_imagenet256_labeled.npz") and cfg.eval.extractor == "inception-v3-compat"
    assert not REGISTRY["decompose"].is_needed(cfg) and REGISTRY["train_tokenizer"].upstream_of(cfg) == ()


def test_paper_settings_in_imagenet_presets():
    cfg = load_config("imagenet256")
    assert (cfg.decompose.order, cfg.decompose.alpha, cfg.decompose.lambda_) == (3, 10.0, 0.01)
    assert cfg.tokenizer.vocab_size == 4096 and cfg.tokenizer.downsample == 16
    assert set(available_presets()) >= {"tiny", "imagenet256", "imagenet512"}


def test_overrides_parse_yaml_values():
    cfg = load_config("tiny", overrides=["shard.resolution=64", "tokenizer.patch_nums=[1,2,4,8,16]",
                                         "decompose.lambda=0.02", "dask.address=null"])
    assert cfg.shard.resolution == 64 and cfg.tokenizer.patch_nums[-1] == 16
    assert cfg.decompose.lambda_ == 0.02 and cfg.dask.address is None


@pytest.mark.parametrize("override, expected", [
    ("shard.reslution=64", "unknown key 'shard.reslution' (allowed here: exif, fingerprint, image_format"),
    ("shard.resolution=big", "shard.resolution='big' is invalid"),
    ("shard.image_format=gif", "shard.image_format='gif' is invalid: Input should be 'jpg' or 'png'"),
    ("nosection.x=1", "unknown key 'nosection'"),
    ("tokenizer.patch_nums=[1,2,4,8,16]", "patch_nums must end at most at the latent side 8"),
    ("tokenizer.patch_nums=[1,4,2]", "patch_nums must not decrease"),
    ("tokenizer.order=4", "tokenizer.order=4 needs decompose.order"),
    ("tokenizer.patch_nums=[1,2,4]", "the base scales must end at the latent side 8 (= shard.resolution / 4), not at 4"),
    ("noequals", "expected KEY=VALUE"),
])
def test_bad_override_is_one_clear_line(override, expected):
    with pytest.raises(UserError, match=None) as info:
        load_config("tiny", overrides=[override])
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("latent, dyadic, expected", [
    (16, False, (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)),  # VAR-256
    (32, False, (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)),  # VAR-512
    (16, True, (1, 2, 4, 8, 16)), (8, False, (1, 2, 4, 8)), (64, False, (1, 2, 4, 8, 16, 32, 64)),
    (24, False, (1, 2, 4, 8, 16, 24)), (1, False, (1,)), (3, True, (1, 2, 3)),
])
def test_derived_schedules_increase_and_end_at_the_latent_side(latent, dyadic, expected):
    from nextdetail.conf.cross import derived_patch_nums

    assert derived_patch_nums(latent, dyadic) == expected


def test_patch_nums_auto_follows_the_resolution_and_the_model():
    assert load_config("tiny").tokenizer.patch_nums == [1, 2, 4, 8]
    assert load_config("tiny", overrides=["shard.resolution=64"]).tokenizer.patch_nums == [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]
    assert load_config("imagenet512").tokenizer.patch_nums == [1, 2, 3, 4, 6, 9, 13, 18, 24, 32]
    # NDP's quadtree needs the dyadic pyramid: `--model ndp` on a VAR-scheduled preset derives it
    from nextdetail.conf import load_branches
    assert load_branches("imagenet256", models=["ndp"])["ndp"].tokenizer.patch_nums == [1, 2, 4, 8, 16]
    # an explicit schedule is kept as given
    assert load_config("tiny", overrides=["tokenizer.patch_nums=[1,2,3,8]"]).tokenizer.patch_nums == [1, 2, 3, 8]


def test_a_later_stages_problem_refuses_only_the_commands_that_run_it():
    """`shard` with a schedule that no longer fits the resolution: shard and decompose run (one warning line
    naming the stage that will refuse); train_tokenizer and `run` refuse in one line."""
    bad = ["shard.resolution=64", "tokenizer.patch_nums=[1,2,4,8]"]
    for until in ("shard", "decompose"):
        cfg = load_config("tiny", overrides=bad, until=until)
        assert cfg.shard.resolution == 64 and len(cfg.warnings()) == 1
        assert "train_tokenizer will refuse" in cfg.warnings()[0] and "latent side 16" in cfg.warnings()[0]
    for until in ("train_tokenizer", "evaluate", None):
        with pytest.raises(UserError, match="latent side 16"):
            load_config("tiny", overrides=bad, until=until)
    assert load_config("tiny", overrides=["shard.resolution=64"], until="shard").warnings() == []
    # an NDP transformer on a tokenizer with detail layers: the tokenizer's stages may still run
    ndp_on_cart = ["ar.model=ndp"]
    assert "train_ar will refuse" in load_config("tiny", overrides=ndp_on_cart, until="tokenize").warnings()[0]
    with pytest.raises(UserError, match="dyadic pyramid"):
        load_config("tiny", overrides=ndp_on_cart, until="train_ar")


def test_cli_stage_commands_warn_about_later_stages_and_run_refuses(tmp_path):
    bad = ["-o", f"storage.root={tmp_path / 'root'}", "-o", "shard.resolution=64", "-o", "tokenizer.patch_nums=[1,2,4,8]"]
    proc = subprocess.run([NEXTDETAIL, "run", "--until", "shard", "--dry-run", *bad], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nextdetail: warning: ") and "train_tokenizer" in lines[0], lines
    proc = subprocess.run([NEXTDETAIL, "run", "--dry-run", *bad], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "latent side 16" in proc.stderr, proc.stderr
    proc = subprocess.run([NEXTDETAIL, "config", "-o", "shard.resolution=64"], capture_output=True, text=True)
    assert proc.returncode == 0 and "patch_nums:\n  - 1\n  - 2\n  - 3\n" in proc.stdout


def test_cli_reports_config_errors_in_one_line_without_traceback():
    proc = subprocess.run([NEXTDETAIL, "run", "-o", "shard.resolution=-3"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "shard.resolution=-3" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_unknown_preset_and_missing_file():
    proc = subprocess.run([NEXTDETAIL, "config", "--preset", "nope"], capture_output=True, text=True)
    assert proc.returncode == 2 and "no preset 'nope' (available: imagenet256, imagenet512, tiny, var-d16-imagenet256)" in proc.stderr
    proc = subprocess.run([NEXTDETAIL, "config", "--config", "/nonexistent.yaml"], capture_output=True, text=True)
    assert proc.returncode == 2 and "/nonexistent.yaml" in proc.stderr


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and sub-command the parser knows, read from the parser itself."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += [(*prefix, name), *_commands(sub, (*prefix, name))]
    return out


def test_cli_help_on_every_command():
    from nextdetail.cli import build_parser
    from nextdetail.stages import STAGES

    commands = _commands(build_parser())
    stage_commands = {s.replace("_", "-") for s in STAGES if s != "evaluate"}  # evaluate's command is `eval`
    assert stage_commands | {"run", "status", "serve", "lineage", "evaluate", "eval", "show", "data", "config"} <= {
        c[0] for c in commands}
    for argv in [(), *commands]:
        proc = subprocess.run([NEXTDETAIL, *argv, "--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and f"usage: nextdetail {' '.join(argv)}".rstrip() in proc.stdout, argv


def test_alpha_is_scaled_to_the_resolution_only_when_a_reference_size_is_given():
    """decompose.alpha_reference_px: α as given at any size by default; with R, α·(side/R)² — the paper's α=10 read
    at 256 px becomes 10/64 at 32 px — and the solver gets that value; the setting is part of the identity."""
    from nextdetail.models.mumford_shah import ATConfig
    from nextdetail.pipeline.declaration import stage_key

    plain = load_config("tiny")
    scaled = load_config("tiny", overrides=["decompose.alpha_reference_px=256"])
    assert plain.decompose.alpha_at(32) == 10.0 == ATConfig.from_settings(plain.decompose, side=32).alpha
    assert scaled.decompose.alpha_at(32) == 10.0 / 64 == ATConfig.from_settings(scaled.decompose, side=32).alpha
    assert scaled.decompose.alpha_at(256) == 10.0
    up = {"shard": "s" * 64}
    assert stage_key(plain, "decompose", up).identity != stage_key(scaled, "decompose", up).identity


CLUSTER_STAGES = [("tokenize", "tokens.resources"), ("sample", "sample.resources"), ("evaluate", "eval.resources")]


@pytest.mark.parametrize("setting", [s for _, s in CLUSTER_STAGES])
@pytest.mark.parametrize("value", ["{GPU: 0}", "{GPU: -1}", "{GPU: x}", "{'a b': 1}", "[GPU]"])
def test_bad_stage_resources_are_one_line_errors(value, setting):
    from nextdetail.conf import load_config
    from nextdetail.errors import UserError

    with pytest.raises(UserError) as err:
        load_config("tiny", overrides=[f"{setting}={value}"])
    assert "\n" not in str(err.value) and setting in str(err.value)


@pytest.mark.parametrize(("stage", "setting"), CLUSTER_STAGES)
def test_resources_say_where_a_stage_runs_not_what_it_computes(stage, setting):
    """`<section>.resources` moves a stage's tasks onto Dask workers: the same identity (the same bytes, tested on a
    cluster in test_tokenize/test_sample/test_evaluate); a LocalCluster without the resource is refused in one line
    before any work."""
    from nextdetail.conf import load_config
    from nextdetail.errors import UserError
    from nextdetail.pipeline.declaration import key_of
    from nextdetail.pipeline.run import check_stage_resources
    from nextdetail.stages import REGISTRY

    plain = load_config("tiny")
    asking = load_config("tiny", overrides=[f"{setting}={{GPU: 1}}"])
    assert REGISTRY[stage].settings(plain) == REGISTRY[stage].settings(asking)
    assert key_of(plain, "shard", {}).identity == key_of(asking, "shard", {}).identity
    assert not REGISTRY[stage].uses_dask(plain) and REGISTRY[stage].uses_dask(asking)
    check_stage_resources({"cart": plain}, ["shard", stage])  # nothing asked: nothing to check
    with pytest.raises(UserError) as err:
        check_stage_resources({"cart": asking}, ["shard", stage])
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"{stage}: {setting} asks for GPU=1") and "dask.resources" in line
    offered = load_config("tiny", overrides=[f"{setting}={{GPU: 1}}", "dask.resources={GPU: 1}"])
    check_stage_resources({"cart": offered}, [stage])
    check_stage_resources({"cart": asking}, ["shard"])  # the stage not selected: not asked


def test_a_preset_adds_its_own_settings_for_a_model_after_the_models_and_before_overrides(tmp_path):
    """`--model ndp` on tiny: NDP's settings (order 0, truncation), then tiny's `models: ndp:` section (issue 41: a
    longer tokenizer training, since 300 steps leave NDP's truncation-trained tokenizer a lottery), then -o."""
    import yaml

    from nextdetail.conf import PRESET_DIR, load_branches
    from nextdetail.errors import UserError

    preset = yaml.safe_load((PRESET_DIR / "tiny.yaml").read_text())
    own = preset["models"]["ndp"]
    assert own["tokenizer.steps"] >= 1000  # issue 41: at 300 steps the tokenizer's draw decided NDP's FID (13 to 44)
    branches = load_branches("tiny", models=["cart", "ndp"])
    ndp, cart = branches["ndp"], branches["cart"]
    assert ndp.tokenizer.order == 0 and ndp.tokenizer.truncation == 0.5
    assert ndp.tokenizer.steps == own["tokenizer.steps"] != cart.tokenizer.steps == preset["tokenizer"]["steps"]
    assert load_branches("tiny", overrides=["tokenizer.steps=7"], models=["ndp"])["ndp"].tokenizer.steps == 7
    # issue 42: at tiny's constant 1e-3 the tokenizer's last iterate put a colour band on every sample's edge rows;
    # CART's tokenizer decays (cosine), NDP's keeps the constant rate its curve was measured with
    assert (cart.tokenizer.decay, ndp.tokenizer.decay) == ("cosine", "constant")
    bad = tmp_path / "bad.yaml"
    for models in ({"vqgan": {"ar.depth": 2}}, {"ndp": ["tokenizer.steps=9"]}):
        bad.write_text(yaml.safe_dump({**preset, "models": models}))
        with pytest.raises(UserError, match="models: must map a model"):
            load_branches(None, bad, models=["ndp"])
