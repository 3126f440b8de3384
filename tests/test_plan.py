"""`nextdetail plan`: the capacity plan agrees with what a run writes, and its front door."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import FAST, cli_config

BIN = Path(sys.executable).parent


def _written(cfg, identities: dict[str, str]) -> dict[str, tuple[int, int]]:
    """(bytes, objects) per stage of what the run with these stage `identities` wrote under the root, as `cache ls`
    lists its artifacts — other tests add artifacts of other configs to the same root, which are left out — and the
    reference statistics (listed under evaluate) it computed: those made before its evaluation was recorded."""
    from nextdetail.cache.inventory import inventory
    from nextdetail.storage.fs import Store

    entries = inventory({"cart": cfg})
    ours = [e for e in entries if identities.get(e.stage) == e.identity]
    evaluated = next(e.created for e in ours if e.stage == "evaluate")
    ours += [e for e in entries if e.stage == "evaluate" and e.identity not in identities.values()
             and e.created is not None and e.created <= evaluated]
    out: dict[str, tuple[int, int]] = {}
    for entry in ours:
        files = len(Store(entry.url, cfg.storage.options).find())
        b, n = out.get(entry.stage, (0, 0))
        out[entry.stage] = (b + entry.bytes, n + files)
    return out


@pytest.mark.e2e
def test_the_plan_of_the_tiny_pipeline_agrees_with_what_it_wrote(pipeline):
    """Bytes and objects per stage and in total within 10 % of the session pipeline's own root (the plan measures a
    sample of the same source, counts the layout and the models); the ImageNet plan scales the same costs."""
    from nextdetail.plan import make_plans
    from nextdetail.storage.shards import shard_count_for

    _, cfg, results = pipeline
    here, imagenet = make_plans(cfg, workers=2)
    written = _written(cfg, dict(results.identities))
    planned = {s.stage: (s.bytes, s.objects) for s in here.stages}
    report = {stage: {"planned": planned[stage], "written": written.get(stage)} for stage in planned}
    print(json.dumps(report, indent=1))
    assert set(written) == set(planned), report
    total_written = sum(b for b, _ in written.values()), sum(n for _, n in written.values())
    assert abs(here.total_bytes / total_written[0] - 1) <= 0.10, report
    assert abs(here.total_objects / total_written[1] - 1) <= 0.10, report
    for stage, (b, n) in written.items():
        assert abs(planned[stage][1] / n - 1) <= 0.10, (stage, report)
        if b > 0.05 * total_written[0]:  # every stage that matters to the total
            assert abs(planned[stage][0] / b - 1) <= 0.10, (stage, report)
    assert imagenet.images["train"] == 1_281_167
    by_stage = {s.stage: s for s in imagenet.stages}
    # ImageNet's factors: three objects per tar (shard, its zarr.json, its part record), not one per image
    tars = sum(shard_count_for(n, cfg.shard.samples_per_shard) for n in imagenet.images.values())
    assert by_stage["decompose"].objects == 3 * tars + 3 + len(imagenet.images) < imagenet.images["train"] / 5


def test_plan_from_a_stated_image_count_when_the_source_cannot_be_listed(tmp_path, capsys):
    """A source that cannot be listed: one line asking for --images; with it, the plan for that count (per-image
    costs measured on the embedded photographs, and said so)."""
    from nextdetail.cli import main

    args = ["plan", "--preset", "tiny", "-o", f"storage.root={tmp_path}",
            "-o", f"data.source={tmp_path / 'no-such-dataset'}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--images" in err, err
    assert main([*args, "--images", "1281167", "--json"]) == 0
    (here,) = json.loads(capsys.readouterr().out)  # ImageNet-1k's size: no second plan beside it
    assert here["images"] == {"train": 1_281_167, "val": 50_000} and "embedded photographs" in here["source"]
    from nextdetail.stages import STAGES

    assert [s["stage"] for s in here["stages"]] == list(STAGES)  # every stage planned, in pipeline order
    decompose = next(s for s in here["stages"] if s["stage"] == "decompose")
    assert decompose["bytes"] > 0 and decompose["hours"] > 0 and decompose["objects"] < 1_281_167 / 5  # per tar


def test_plan_writes_nothing_under_the_root(tmp_path):
    root = tmp_path / "root"
    out = subprocess.run([str(BIN / "nextdetail"), "plan", *cli_config(root, "embedded", *FAST)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "ImageNet-1k" in out.stdout and "assumptions:" in out.stdout
    assert not root.exists()
