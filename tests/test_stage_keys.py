"""Stage keys as data (conf/stages.py): what changes an identity and what does not."""

from __future__ import annotations

import pytest

from nextdetail.conf import STAGES, load_config
from nextdetail.conf.stages import SPECS, downstream, output_identity, stage_key, upstream_closure

pytestmark = pytest.mark.fast

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
        assert all(STAGES.index(u) < i for u in SPECS[stage].upstream)
        assert set(upstream_closure(stage)) >= set(SPECS[stage].upstream)
    assert downstream("shard") == list(STAGES[1:]) and downstream("evaluate") == []
    # early cutoff: what downstream keys on is the bytes, whatever identity (code) wrote them
    assert output_identity("shard", "i", {"content_sha256": "c"}) == output_identity("shard", "j", {"content_sha256": "c"})
    assert output_identity("train_ar", "i", {"weights_sha256": "w"}) == "train_ar:w"
    assert output_identity("decompose", "i", {"content_sha256": "c"}) == "decompose:c"
    assert output_identity("decompose", "i", {}) == "i"  # built before its content was hashed
    assert output_identity("sample", "i", {"content_sha256": "c"}) == "i"  # nothing reads it: its identity
    with pytest.raises(ValueError, match="upstream identities missing"):
        stage_key(load_config("tiny"), "decompose", {}, inputs={})
