"""Nothing outside the roots (issue 33): a file planted on a shared bucket — a weights file that is not ours, a Zarr
array naming a codec we never write, a checkpoint naming its tokenizer elsewhere — and a Secret block stored so that
Prefect lists it in clear are each refused in one line naming the file and the fix; nothing is fetched or run."""

from __future__ import annotations

import http.server
import json
import sys
import threading
import warnings
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_cli

from nextdetail.errors import UserError

NEXTDETAIL = str(Path(sys.executable).parent / "nextdetail")


def _one_line(call, *words: str) -> str:
    with pytest.raises(UserError) as info:
        call()
    line = str(info.value)
    assert "\n" not in line and all(w in line for w in words), line
    return line


def _torchscript(path: Path) -> Path:
    with warnings.catch_warnings():  # torch.jit is deprecated: still what a planted file can be
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    return path


# ---- weights files ------------------------------------------------------------------------------


def test_a_torchscript_file_is_refused_in_one_line_by_every_loader(tmp_path):
    from nextdetail.models.tokenizer import BaseDetailVQVAE, load_tokenizer
    from nextdetail.stages.train_ar.tasks import load_transformer
    from nextdetail.storage.checkpoints import read_released, read_torch
    from nextdetail.storage.hashing import bytes_sha256

    ts = _torchscript(tmp_path / "model.pt")
    assert "constants.pkl" in "".join(zipfile.ZipFile(ts).namelist())  # what torch.load would hand to torch.jit
    for call in (lambda: read_torch(str(ts), str(ts)), lambda: read_torch(ts.read_bytes(), str(ts)),
                 lambda: load_transformer(str(ts)), lambda: BaseDetailVQVAE.from_checkpoint(str(ts)),
                 lambda: load_tokenizer(str(ts), {}, bytes_sha256(ts.read_bytes()), "a token cache")):
        _one_line(call, str(ts), "not written by nextdetail", "TorchScript")
    _one_line(lambda: read_released("ar.pretrained", str(ts), {}), f"ar.pretrained={ts}", "TorchScript")


def test_sample_ckpt_of_a_torchscript_file_is_one_line_exit_2(tmp_path):
    ts = _torchscript(tmp_path / "model.pt")
    proc = run_cli([NEXTDETAIL, "sample", "--ckpt", str(ts), "--out", str(tmp_path / "out"), "--preset", "tiny",
                    "-o", f"storage.root={tmp_path / 'root'}"])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"nextdetail: {ts}: not written by nextdetail"), proc.stderr


def _with_extra_record(path: Path) -> Path:
    torch.save({"spec": {}, "model": {}}, path)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(f"{path.stem}/extra/run.py", "print('hi')")
    return path


def _truncated(path: Path) -> Path:
    torch.save({"spec": {}, "model": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:2000])
    return path


def _a_list(path: Path) -> Path:
    torch.save([torch.zeros(2)], path)
    return path


def _no_spec(path: Path) -> Path:
    torch.save({"model": {}}, path)
    return path


def _other_spec(path: Path) -> Path:
    torch.save({"spec": {"no_such_setting": 1}, "model": {}}, path)
    return path


@pytest.mark.parametrize("make, why", [(_with_extra_record, "records torch.save does not write"),
                                       (_truncated, "truncated"), (_a_list, "a list"), (_no_spec, "no 'spec'"),
                                       (_other_spec, "do not fit the tokenizer")])
def test_a_foreign_tokenizer_file_is_refused_in_one_line(tmp_path, make, why):
    from nextdetail.models.tokenizer import BaseDetailVQVAE

    path = make(tmp_path / "tokenizer.pt")
    _one_line(lambda: BaseDetailVQVAE.from_checkpoint(path.read_bytes(), where=str(path)), str(path),
              "not written by nextdetail", why)


def _tiny_export(tokenizer_url: str) -> dict:
    """What `train_ar.export` writes, for a tiny CART model."""
    from nextdetail.models.transformer import NextDetailTransformer, TransformerConfig

    cfg = TransformerConfig(sides=(1, 2), vocab_size=8, cvae=4, num_classes=2, depth=1, width=32, heads=2)
    return {"format": 1, "kind": "cart", "config": asdict(cfg), "model": NextDetailTransformer(cfg).state_dict(),
            "step": 0, "val_loss": None, "classes": ["a", "b"], "token_cache": "x",
            "tokenizer": {"url": tokenizer_url, "sha256": "0" * 64}}


def test_a_transformer_checkpoint_of_another_layout_is_one_line(tmp_path):
    from nextdetail.stages.train_ar.tasks import load_transformer

    good = _tiny_export("/root/tokenizer/d/r/tokenizer.pt")
    model, record = load_transformer(_save(tmp_path / "good.pt", good))
    assert record["classes"] == ["a", "b"] and not model.training
    cases = [({**good, "tokenizer": "http://x"}, "no tokenizer url and sha256"),
             ({**good, "config": {**good["config"], "width": 64}}, "do not fit the model"),
             ({**good, "kind": "other"}, "model kind 'other'")]
    for i, (saved, why) in enumerate(cases):
        path = _save(tmp_path / f"bad{i}.pt", saved)
        _one_line(lambda p=path: load_transformer(p), path, "not written by nextdetail", why)


def _save(path: Path, obj) -> str:
    torch.save(obj, path)
    return str(path)


# ---- Zarr codecs --------------------------------------------------------------------------------


def _factors(tmp_path: Path):
    """A factors group as decompose writes it (one array, consolidated), and its Store."""
    from nextdetail.storage import factors
    from nextdetail.storage.fs import Store

    store = Store(str(tmp_path))
    factors.create_groups(store, ["train"])
    factors.create_array(store, "train", "train-000000.tar", 4, (1, 3, 4, 4), "float16", 2)
    factors.write_whole(store, "train", "train-000000.tar", np.full((4, 1, 3, 4, 4), 0.5, dtype="float16"))
    factors.consolidate(store)
    return store


def _edit(path: Path, change) -> None:
    """Rewrite the JSON file `path` with `change(meta)` applied, as someone with write access to the bucket can."""
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def _pickle_second(meta: dict) -> None:
    """The shard's inner codecs (bytes, blosc) with blosc replaced by numcodecs' pickle."""
    meta["codecs"][0]["configuration"]["codecs"][1] = {"name": "numcodecs.pickle", "configuration": {}}


def test_the_allowed_codecs_are_those_the_project_writes(tmp_path):
    from nextdetail.storage import factors
    from nextdetail.storage.codecs import WRITTEN, codec_names

    store = _factors(tmp_path)
    names = codec_names(json.loads((tmp_path / "factors.zarr/train/train-000000/zarr.json").read_text()))
    factors.create_array(store, "train", "train-000001.tar", 2, (1, 3, 4, 4), "uint8", 1)  # a quantized store's
    names += codec_names(json.loads((tmp_path / "factors.zarr/train/train-000001/zarr.json").read_text()))
    assert sorted(set(names)) == sorted(WRITTEN), "the writers changed codecs: update storage/codecs.py:WRITTEN"
    group = factors.open_group(store)
    assert float(factors.open_array(store, group, "train", "train-000000.tar")[0].max()) == 0.5


def test_a_zarr_array_naming_numcodecs_pickle_is_refused_before_zarr_opens_it(tmp_path):
    from nextdetail.storage import factors

    store = _factors(tmp_path)
    group = factors.open_group(store)
    array_json = tmp_path / "factors.zarr/train/train-000000/zarr.json"
    _edit(array_json, _pickle_second)
    line = _one_line(lambda: factors.open_array(store, group, "train", "train-000000.tar"), f"{array_json}: ",
                     "codec 'numcodecs.pickle' is not one nextdetail writes (allowed: bytes, blosc, nextdetail.lossless_image, "
                     "sharding_indexed, crc32c)",
                     "not written by nextdetail — delete it and re-run the stage that writes it")
    print(line)
    # in the array's own list, in the shard index's codecs, and in the consolidated copy of the metadata Zarr
    # opens the array from
    _edit(array_json, lambda meta: meta.update(codecs=[{"name": "bytes"}, {"name": "numcodecs.pickle"}]))
    _one_line(lambda: factors.open_array(store, group, "train", "train-000000.tar"), "'numcodecs.pickle'")
    sharded = [{"name": "sharding_indexed", "configuration": {"chunk_shape": [1, 1, 3, 4, 4], "codecs": [
        {"name": "bytes"}], "index_codecs": [{"name": "bytes"}, {"name": "numcodecs.zlib"}]}}]
    _edit(array_json, lambda meta: meta.update(codecs=sharded))
    _one_line(lambda: factors.open_array(store, group, "train", "train-000000.tar"), "'numcodecs.zlib'")
    root_json = tmp_path / "factors.zarr/zarr.json"
    _edit(root_json, lambda meta: _pickle_second(meta["consolidated_metadata"]["metadata"]["train/train-000000"]))
    _one_line(lambda: factors.open_group(store), f"{root_json}: ", "'numcodecs.pickle'")
    # the writer replaces such an array rather than opening it to compare its layout
    _edit(root_json, lambda m: m.pop("consolidated_metadata"))
    factors.create_array(store, "train", "train-000000.tar", 4, (1, 3, 4, 4), "float16", 2)
    assert "numcodecs" not in array_json.read_text()


def test_zarr_metadata_that_is_not_a_json_object_is_refused(tmp_path):
    from nextdetail.storage.codecs import check_codecs

    store = _factors(tmp_path)
    (tmp_path / "factors.zarr/train/train-000000/zarr.json").write_text("[1, 2]")
    _one_line(lambda: check_codecs(store, "factors.zarr/train/train-000000"), "not a JSON object")
    check_codecs(store, "factors.zarr/train/no-such-array")  # missing: Zarr says so itself


# ---- Prefect Secret blocks ----------------------------------------------------------------------


def test_a_secret_block_holding_a_mapping_is_refused_a_json_string_accepted():
    from prefect.blocks.system import Secret

    from nextdetail.conf.secrets import credentials_from_secret

    creds = {"key": "AKIA-not-shown", "secret": "s3cr3t-not-shown"}
    # what read_credentials_block hands over: the stored value (Secret.get() would parse a JSON string to a dict)
    as_dict = Secret(value=creds).value.get_secret_value()
    line = _one_line(lambda: credentials_from_secret("team-bucket", as_dict), "'team-bucket'", "a mapping",
                     "json.dumps")
    assert "not-shown" not in line
    print(line)
    assert credentials_from_secret("team-bucket", Secret(value=json.dumps(creds)).value.get_secret_value()) == creds
    for value in ("[1, 2]", "not json", 7):
        assert "not-shown" not in _one_line(lambda v=value: credentials_from_secret("b", v), "JSON object")


# ---- the tokenizer a checkpoint names -----------------------------------------------------------


def _tokenizer_file(root: Path) -> Path:
    path = root / "tokenizer" / "ds" / "run" / "tokenizer.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"weights")
    return path


def test_a_tokenizer_reference_resolves_only_under_the_roots(tmp_path):
    from nextdetail.stages.sample.tasks import checkpoint_root, tokenizer_url

    ckpt = str(tmp_path / "new" / "transformer" / "ds" / "run" / "transformer.pt")
    assert checkpoint_root(ckpt) == str(tmp_path / "new") and checkpoint_root("/a/b/transformer.pt") is None
    old, new = tmp_path / "old", tmp_path / "new"
    recorded = str(_tokenizer_file(old))
    roots = (str(new),)
    # the root copied elsewhere: the recorded absolute path is rebased onto it, the old one never read
    _one_line(lambda: tokenizer_url(ckpt, recorded, roots, {}), "outside the roots")  # nothing there yet
    _tokenizer_file(new)
    assert tokenizer_url(ckpt, recorded, roots, {}) == str(new / "tokenizer/ds/run/tokenizer.pt")
    assert tokenizer_url(ckpt, str(new / "tokenizer/ds/run/tokenizer.pt"), roots, {}).startswith(str(new))
    # `..` cannot climb out of a root, even to a file that exists
    (tmp_path / "elsewhere.pt").write_bytes(b"x")
    line = _one_line(lambda: tokenizer_url(ckpt, f"{new}/tokenizer/../../elsewhere.pt", roots, {}),
                     f"{ckpt}: names its tokenizer at {new}/tokenizer/../../elsewhere.pt, outside the roots this "
                     f"run was given ({new}); nothing is fetched — copy the tokenizer under the root")
    print(line)
    for url in ("http://127.0.0.1:9/tokenizer.pt", "https://example.com/x/tokenizer/ds/run/tokenizer.pt",
                "ftp://h/tokenizer/ds/run/tokenizer.pt", "tokenizer/ds/run/tokenizer.pt",
                f"simplecache::{new}/tokenizer/ds/run/tokenizer.pt"):
        _one_line(lambda u=url: tokenizer_url(ckpt, u, roots, {}), f"names its tokenizer at {url}, outside")


def test_sampling_a_checkpoint_naming_an_http_tokenizer_fetches_nothing(tmp_path):
    from nextdetail.stages.sample.tasks import load_models

    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(404)
            self.end_headers()

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        root = tmp_path / "root"
        ckpt = root / "transformer" / "ds" / "run" / "transformer.pt"
        ckpt.parent.mkdir(parents=True)
        torch.save(_tiny_export(f"http://127.0.0.1:{server.server_port}/tokenizer.pt"), ckpt)
        _one_line(lambda: load_models(str(ckpt), {}, "cpu", roots=(str(root),)), f"{ckpt}: names its tokenizer at "
                  f"http://127.0.0.1:{server.server_port}/tokenizer.pt, outside the roots", "nothing is fetched")
    finally:
        server.shutdown()
    assert hits == []
