"""Stage keys as data (pipeline/declaration.py): what changes an identity and what does not."""

from __future__ import annotations

import pytest

from nextdetail.conf import load_config
from nextdetail.pipeline.declaration import output_identity, stage_key
from nextdetail.pipeline.result import StageResult
from nextdetail.stages import REGISTRY, STAGES, downstream, upstream_closure

UP = {"shard": "s" * 64, "decompose": "d" * 64, "train_tokenizer": "t" * 64, "tokenize": "k" * 64,
      "train_ar": "a" * 64}


def _key(stage: str, *overrides: str, upstream: dict | None = None):
    cfg = load_config("tiny", overrides=["data.source=embedded", *overrides])
    return stage_key(cfg, stage, upstream or UP, inputs={})


@pytest.mark.parametrize("stage, what_matters, how_it_runs", [
    ("decompose", "decompose.alpha=5", "decompose.device=cuda"),
    ("train_tokenizer", "tokenizer.steps=31", "tokenizer.torch_threads=1"),
    ("tokenize", "tokens.variants=[none]", "tokens.batch_size=7"),
    ("train_ar", "ar.depth=3", "ar.nproc=2"),
    ("sample", "sample.seed=3", "sample.batch_size=5"),
    ("evaluate", "eval.seed=4", "eval.batch_size=5"),
])
def test_a_setting_that_changes_results_changes_the_identity_and_how_it_runs_does_not(stage, what_matters,
                                                                                     how_it_runs):
    base = _key(stage)
    assert _key(stage, what_matters).identity != base.identity
    assert _key(stage, how_it_runs).identity == base.identity
    assert _key(stage, "storage.root=/elsewhere", "dask.n_workers=1").identity == base.identity


@pytest.mark.parametrize("stage, section", [("train_tokenizer", "tokenizer"), ("train_ar", "ar")])
def test_a_decay_floor_counts_only_when_the_rate_decays(stage, section):
    """`min_lr_ratio` is the floor of a decay: at the constant rate it changes nothing the stage computes."""
    constant = _key(stage, f"{section}.decay=constant")
    assert _key(stage, f"{section}.decay=constant", f"{section}.min_lr_ratio=0.5").identity == constant.identity
    cosine = _key(stage, f"{section}.decay=cosine")
    assert cosine.identity != constant.identity
    assert _key(stage, f"{section}.decay=cosine", f"{section}.min_lr_ratio=0.5").identity != cosine.identity


def test_the_mosaic_term_counts_only_when_on():
    """`tokenizer.mosaic_weight` 0 (off) keys as the tokenizers trained before the setting existed; on, it keys."""
    off = _key("train_tokenizer")
    assert "mosaic_weight" not in off.settings["tokenizer"]
    assert _key("train_tokenizer", "tokenizer.mosaic_weight=0").identity == off.identity
    assert _key("train_tokenizer", "tokenizer.mosaic_weight=0.5").identity != off.identity


def test_upstream_changes_the_identity_but_not_the_recipe_parts_follow_the_recipe():
    base = _key("decompose")
    other = _key("decompose", upstream={**UP, "shard": "x" * 64})
    assert other.identity != base.identity and other.recipe == base.recipe
    assert other.part({"tar": "t1"}) == base.part({"tar": "t1"}) != base.part({"tar": "t2"})  # content-addressed
    assert other.artifact("p") != base.artifact("p")  # artifacts inside the stage's output follow the stage
    assert base.identity == _key("decompose").identity  # deterministic


def test_the_table_is_a_dag_in_pipeline_order_and_outputs_carry_their_bytes():
    for i, stage in enumerate(STAGES):
        assert all(STAGES.index(u) < i for u in REGISTRY[stage].upstream)
        assert set(upstream_closure(stage)) >= set(REGISTRY[stage].upstream)
    assert downstream("shard") == list(STAGES[1:]) and downstream("evaluate") == []
    # early cutoff: what downstream keys on is the bytes, whatever identity (code) wrote them
    assert output_identity("shard", "i", {"content_sha256": "c"}) == output_identity("shard", "j", {"content_sha256": "c"})
    assert output_identity("train_ar", "i", {"weights_sha256": "w"}) == "train_ar:w"
    assert output_identity("decompose", "i", {"content_sha256": "c"}) == "decompose:c"
    assert output_identity("decompose", "i", {}) == "i"  # built before its content was hashed
    assert output_identity("sample", "i", {"content_sha256": "c"}) == "i"  # nothing reads it: its identity
    with pytest.raises(ValueError, match="upstream identities missing"):
        stage_key(load_config("tiny"), "decompose", {}, inputs={})


def test_every_stage_is_one_package_whose_flow_takes_its_upstream_by_name():
    """The registry finds each stage package (its declaration named as the package), orders them by their
    upstream, and each flow's `run` takes exactly the declared upstream stages as keyword-only parameters: a
    reordered upstream list cannot swap arguments."""
    import importlib
    import inspect

    assert STAGES == ("shard", "decompose", "train_tokenizer", "tokenize", "train_ar", "sample", "evaluate")
    for name, stage in REGISTRY.items():
        assert stage.name == name and stage.flow == f"nextdetail.stages.{name}.flow"
        module = importlib.import_module(stage.flow)
        params = inspect.signature(module.run).parameters
        by_name = [p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY
                   and p not in ("progress", "scheduler")]
        assert by_name == list(stage.upstream), (name, by_name)
        assert list(params)[:2] == ["cfg", "key"] and ("scheduler" in params) == bool(stage.dask), name
        assert issubclass(stage.result, StageResult) and stage.result is not StageResult
        assert hasattr(module, "stage_flow"), name
    assert {s.result for s in REGISTRY.values()}.__len__() == len(STAGES)  # one result type per stage


def test_pipeline_order_follows_upstream_then_fewer_upstream_and_refuses_cycles_and_unknown_stages():
    from nextdetail.pipeline.declaration import Stage
    from nextdetail.stages import pipeline_order

    def declared(*pairs):
        return {n: Stage(n, n, tuple(up), lambda c: {}, StageResult) for n, up in pairs}

    got = pipeline_order(declared(("z", ["b", "a"]), ("b", ["a"]), ("y", ["b"]), ("a", [])))
    assert list(got) == ["a", "b", "y", "z"]  # y and z both ready after b: y reads fewer stages
    for bad in (declared(("a", ["b"]), ("b", ["a"])), declared(("a", ["nothing"]))):
        with pytest.raises(AssertionError, match="cycle or an unknown upstream"):
            pipeline_order(bad)


EXPORT_STAGE = {
    "__init__.py": '''"""A stage added for the test: exports the transformer."""

from __future__ import annotations

from dataclasses import dataclass

from nextdetail.pipeline.declaration import Stage
from nextdetail.pipeline.result import StageResult


@dataclass
class ExportResult(StageResult):
    @staticmethod
    def describe(summary: dict) -> str:
        return f"export: {summary['bytes']} bytes"


STAGE = Stage("export", "exports", ("train_ar",), lambda c: {"export": c.export.model_dump()}, ExportResult,
              command_help="the transformer → an exported file")
''',
    "flow.py": '''from __future__ import annotations

from prefect import flow

from nextdetail.stages.export.tasks import export_weights


@flow(name="export")
def stage_flow(cfg, key, train_ar, progress=True):
    return export_weights(cfg, train_ar)


def run(cfg, key, *, train_ar, progress=True):
    return stage_flow(cfg, key, train_ar=train_ar, progress=progress)
''',
    "tasks.py": '''def export_weights(cfg, train_ar):
    return None
''',
}
ADDED = r"""
import json, subprocess, sys
from nextdetail.cli import build_parser
from nextdetail.conf import load_config
from nextdetail.stages import REGISTRY, STAGES, downstream, select_stages
cfg = load_config("tiny", overrides=["export.format=safetensors"])
help_text = build_parser().format_help()
print(json.dumps({"stages": list(STAGES), "downstream": downstream("train_ar"), "until": select_stages(until="export"),
                  "code": sorted(REGISTRY["export"].code(cfg)), "settings": REGISTRY["export"].settings(cfg),
                  "command": "export" in help_text and "the transformer → an exported file" in help_text}))
"""


def test_adding_a_stage_is_its_package_and_its_settings_section(tmp_path):
    """On a copy of the package, a new stage `export` reading train_ar: its package (declaration, flow, tasks) and a
    settings section in conf/schema.py — two places — and the registry orders it, `--until export` selects it,
    its code identity is derived, and `nextdetail export` exists."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import nextdetail

    src = tmp_path / "src"
    shutil.copytree(Path(nextdetail.__file__).parent, src / "nextdetail", ignore=shutil.ignore_patterns("__pycache__"))
    package = src / "nextdetail" / "stages" / "export"
    package.mkdir()
    for name, text in EXPORT_STAGE.items():
        (package / name).write_text(text)
    schema = src / "nextdetail" / "conf" / "schema.py"
    text = schema.read_text()
    anchor = "class PipelineConfig(_Section):\n"
    assert anchor in text and "    eval: EvalConfig" in text
    text = text.replace(anchor, 'class ExportConfig(_Section):\n    format: Literal["pt", "safetensors"] = "pt"\n\n\n'
                        + anchor).replace("    eval: EvalConfig", "    export: ExportConfig = Field(default_factory="
                                          "ExportConfig)\n    eval: EvalConfig", 1)
    schema.write_text(text)
    proc = subprocess.run([sys.executable, "-c", ADDED], capture_output=True, text=True, cwd=tmp_path,
                          env={**__import__("os").environ, "PYTHONPATH": str(src)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = __import__("json").loads(proc.stdout)
    assert got["stages"] == ["shard", "decompose", "train_tokenizer", "tokenize", "train_ar", "export", "sample",
                             "evaluate"]
    assert got["downstream"] == ["export", "sample", "evaluate"]
    assert got["until"] == ["shard", "decompose", "train_tokenizer", "tokenize", "train_ar", "export"]
    assert "nextdetail/stages/export/flow.py" in got["code"] and "nextdetail/stages/export/tasks.py" in got["code"]
    assert "nextdetail/stages/export/__init__.py" not in got["code"]  # the declaration: settings count as values
    assert got["settings"] == {"export": {"format": "safetensors"}} and got["command"]
