"""The GPU check (`benchmarks/gpu.py`, issue 36) runs every part on a CPU, and what it imports needs only
torch and numpy: the lent GPU machine has none of the pipeline's other dependencies."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARTS = ("decomposition", "tokenizer", "transformer", "sampling", "evaluation", "distributed")
KEYS = ("figure", "value", "baseline", "ratio", "device", "dtype", "batch", "ok")
PIPELINE_ONLY = ("prefect", "dask", "distributed", "zarr", "pydantic", "webdataset", "torch_fidelity", "fsspec",
                 "s3fs", "pyarrow", "yaml")


def test_quick_cpu_run_reports_every_part(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--device", "cpu", "--quick",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    written = json.loads(out.read_text())
    assert [r["part"] for r in lines] == [r["part"] for r in written["parts"]] == list(PARTS)
    for record in written["parts"]:
        assert all(key in record for key in KEYS), (record["part"], sorted(record))
        assert record["ok"], (record["part"], record["error"], record.get("traceback"))
    by_part = {r["part"]: r for r in written["parts"]}
    assert by_part["decomposition"]["agreement"]["within_bound"]
    assert by_part["distributed"]["destroyed"] and by_part["distributed"]["finite"]
    assert written["meta"]["device"].startswith("cpu") and "total_seconds" in written["meta"]
    assert "decomposition" in proc.stderr and "distributed" in proc.stderr  # the table


def test_models_and_the_check_import_without_the_pipeline():
    """A bare interpreter where every pipeline-only package fails to import: the models the check runs, and the
    check itself, still import; its Inception falls back from torch-fidelity to torchvision's network."""
    code = textwrap.dedent(f"""
        import importlib, importlib.abc, importlib.util, sys
        BLOCKED = {set(PIPELINE_ONLY)!r}

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] in BLOCKED:
                    raise ImportError(f"blocked: {{name}}")
                return None

        sys.meta_path.insert(0, Block())
        sys.path.insert(0, {str(REPO)!r})
        for name in ("mumford_shah", "tokenizer", "transformer", "sampler", "feature_extractor"):
            importlib.import_module("nextdetail.models." + name)
        spec = importlib.util.spec_from_file_location("gpu_check", {str(REPO / "benchmarks" / "gpu.py")!r})
        gpu = sys.modules["gpu_check"] = importlib.util.module_from_spec(spec)  # dataclasses look themselves up
        spec.loader.exec_module(gpu)
        import torch
        try:
            import torchvision  # noqa: F401
        except ImportError:
            print("no torchvision")
        else:
            model, network = gpu.seeded_inception(torch.device("cpu"))
            assert "torchvision" in network, network
            assert model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).shape[0] == 1
        print("imports ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "imports ok" in proc.stdout
