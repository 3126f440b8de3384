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
        assert list(params)[:2] == ["cfg", "key"] and ("scheduler" in params) == stage.dask, name
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
