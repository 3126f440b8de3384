"""The tokenizer's reconstruction quality (part of `evaluate`, its own shared artifact): the cached tokens of a
held-out split decoded and compared with the originals — rFID against that split's reference statistics, PSNR.

It depends on the token cache (and so on the tokenizer's weights), not on the transformer: one artifact per
token cache × reference × extractor, identity from `pipeline.declaration.shared_identity(__name__, …)`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nextdetail.conf.schema import EvalConfig
from nextdetail.errors import UserError
from nextdetail.pipeline.tasks import Artifact, stage_task
from nextdetail.stages.evaluate.reference_stats import RefHandle
from nextdetail.storage.fs import Store


@dataclass(frozen=True)
class TokenizerEvalInputs:
    tokens_url: str
    tokens_options: dict | None
    local_cache: str | None
    tokenizer_url: str
    tokenizer_sha256: str
    shards_url: str
    image_format: str
    options: dict
    split: str
    reference: RefHandle  # statistics of the same held-out images


def run_tokenizer_metrics(store: Store, inputs: TokenizerEvalInputs, ecfg: EvalConfig, log: Callable[[str], None] = print,
                          progress: bool = False) -> tuple[dict[str, Any], list[str]]:
    """Decode the cached tokens of the held-out split (variant "none") and compare with the originals:
    rFID against their reference statistics, mean PSNR."""
    from nextdetail.models import fidelity
    from nextdetail.models.feature_extractor import build_extractor
    from nextdetail.models.tokenizer import images_to_uint8 as to_uint8
    from nextdetail.models.tokenizer import load_tokenizer
    from nextdetail.storage.shards import read_tar_images
    from nextdetail.storage.tokens import TokenCache

    device = ecfg.device
    tokenizer = load_tokenizer(inputs.tokenizer_url, inputs.options, inputs.tokenizer_sha256,
                               f"the token cache {inputs.tokens_url}").to(device).eval()
    extractor, info = build_extractor(ecfg.extractor, ecfg.inception_weights, ecfg.weights_cache, device)
    cache = TokenCache(inputs.tokens_url, inputs.tokens_options, inputs.local_cache)
    variant = cache.variants.index("none") if "none" in cache.variants else 0
    rows = [r for r in cache.index().to_pylist() if r["split"] == inputs.split]
    if not rows:
        raise UserError(f"the token cache {inputs.tokens_url} has no {inputs.split!r} images; set -o eval.rfid_split=… "
                        "to a tokenized split or -o eval.rfid=false")
    by_tar: dict[str, list[dict]] = {}
    for r in sorted(rows, key=lambda r: r["key"]):
        by_tar.setdefault(r["shard"], []).append(r)
    shards = Store(inputs.shards_url, inputs.options)
    psnrs, batches = [], []
    for tar, tar_rows in by_tar.items():
        tokens = cache.read(inputs.split, tar)[[r["row"] for r in tar_rows], variant]  # (n, L)
        originals = read_tar_images(shards, tar, tuple(r["key"] for r in tar_rows), inputs.image_format)
        for i in range(0, len(tar_rows), ecfg.batch_size):
            maps = [torch.from_numpy(m.astype(np.int64)).to(device) for m in cache.maps(tokens[i : i + ecfg.batch_size])]
            recon = to_uint8(tokenizer.indices_to_img(maps))  # (B, H, W, 3)
            psnrs.append(fidelity.psnr(recon, originals[i : i + ecfg.batch_size]))
            batches.append(recon)
    feats = fidelity.extract(extractor, batches, (info.fid_layer, info.isc_layer), device, progress,
                             desc="reconstruction features")
    _, real_stats = inputs.reference.load()
    rfid = fidelity.fid(fidelity.statistics(feats["fid"]), real_stats)
    psnr = float(np.concatenate(psnrs).mean())
    summary = {"rfid": round(rfid, 6), "psnr": round(psnr, 4), "images": len(feats["fid"]), "split": inputs.split,
               "extractor": info.name, "tokenizer": inputs.tokenizer_url, "reference": inputs.reference.identity}
    log(f"evaluate: tokenizer reconstructions of {summary['images']} {inputs.split} images: rFID {rfid:.3f}, "
        f"PSNR {psnr:.2f} dB")
    store.write_bytes("metrics.json", json.dumps(summary, indent=1).encode())
    return summary, ["metrics.json"]


@stage_task(name="tokenizer_metrics", retries=1)
def tokenizer_metrics(artifact: Artifact, inputs: TokenizerEvalInputs, ecfg: EvalConfig,
                      progress: bool = False) -> tuple[dict, list[str]]:
    from prefect import get_run_logger

    return run_tokenizer_metrics(artifact.store, inputs, ecfg, get_run_logger().info, progress)


def plan_tokenizer_metrics(parent: Store, tokens_identity: str, inputs: TokenizerEvalInputs,
                           extractor: dict[str, str]) -> Artifact:
    """Under `parent`/tokenizer-<identity[:12]>; `tokens_identity` is the token cache's, which keys on the
    tokenizer's weights."""
    from nextdetail.pipeline.code import shared_identity

    upstream = {"tokens": tokens_identity, "reference": inputs.reference.identity, "extractor": extractor,
                "split": inputs.split}
    identity, code = shared_identity(__name__, upstream)
    return Artifact("tokenizer_metrics", identity, parent.sub(f"tokenizer-{identity[:12]}"), "_COMPLETE.json",
                    lineage={"code": code, "upstream": upstream})
