"""Feature extractors for FID / IS / KID / precision-recall, as torch-fidelity feature extractors.

- ``inception-v3-compat`` (torch-fidelity's own): the network every published FID and IS uses. Its
  weights (``weights-inception-2015-12-05-6726825d.pth``) come from a local path or a URL in config, else
  from torch-fidelity's own download; with neither, `build_extractor` says in one line how to provide them.
- ``nextdetail-randconv-v1`` (ours, registered with torch-fidelity on import): four random 3×3
  convolutions (stride 2, ReLU) on the image resized to 64 px, globally averaged into 512 features, and a
  random linear map of those to 1000 "logits" for IS. Its weights are generated from a fixed seed by
  NumPy's PCG64 — nothing to download, the same numbers on every machine — so offline runs and the tests
  can compute every metric. Random-feature FID ranks image sets by their distance to the reference, but
  its values are on another scale: **numbers from it are not comparable with published FID or IS**, and
  every report that uses it says so.

Both take uint8 images (B, 3, H, W) of any size and return the features torch-fidelity asks for.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nextdetail.errors import UserError

try:
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
except ImportError:  # the GPU check (benchmarks/gpu.py) imports models without the pipeline's dependencies

    class FeatureExtractorBase(torch.nn.Module):  # type: ignore[no-redef]
        """What `RandomConvFeatures` uses of torch-fidelity's base class, where torch-fidelity is not installed."""

        def __init__(self, name: str, features_list: list[str]) -> None:
            super().__init__()
            self.name, self.features_list = name, list(features_list)

INCEPTION = "inception-v3-compat"
RANDCONV = "nextdetail-randconv-v1"
EXTRACTORS = (INCEPTION, RANDCONV)
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


class RandomConvFeatures(FeatureExtractorBase):
    """Deterministic random-weight conv features (see the module docstring); torch-fidelity's interface."""

    INPUT_SIZE = 64
    WIDTHS = (64, 128, 256, 512)
    NUM_LOGITS = 1000
    SEED = 20_261_123
    FEATURE_SCALE = 2.0  # mean feature ≈ 0.4, like Inception-v3's pool features (KID's cubic kernel is scale-sensitive)
    LOGIT_SCALE = 8.0  # spreads the softmax: IS of the embedded photos ≈ 2.4 instead of pinned near 1

    def __init__(self, name: str, features_list: list[str], **kwargs: Any) -> None:
        super().__init__(name, features_list)
        rng = np.random.Generator(np.random.PCG64(self.SEED))  # PCG64: the same stream on every platform
        fan_in = 3
        for i, width in enumerate(self.WIDTHS):
            w = rng.standard_normal((width, fan_in, 3, 3), dtype=np.float64) * np.sqrt(2.0 / (fan_in * 9))  # He
            self.register_buffer(f"conv{i}", torch.from_numpy(w.astype(np.float32)))
            fan_in = width
        head = rng.standard_normal((self.NUM_LOGITS, fan_in), dtype=np.float64) / np.sqrt(fan_in)
        self.register_buffer("head", torch.from_numpy((head * self.LOGIT_SCALE).astype(np.float32)))
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("features", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, RandomConvFeatures.INPUT_SIZE, RandomConvFeatures.INPUT_SIZE, dtype=torch.uint8)

    def weights_sha256(self) -> str:
        h = hashlib.sha256()
        for name, t in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expects uint8 images (B, 3, H, W), got {tuple(x.shape)} {x.dtype}")
        h = x.float().div(127.5).sub(1)  # (B, 3, H, W) in [-1, 1]
        h = F.interpolate(h, size=(self.INPUT_SIZE, self.INPUT_SIZE), mode="bilinear", align_corners=False,
                          antialias=True)
        for i in range(len(self.WIDTHS)):
            h = F.relu(F.conv2d(h, getattr(self, f"conv{i}"), stride=2, padding=1))  # side halves: 64 → 4
        features = h.mean(dim=(2, 3)) * self.FEATURE_SCALE  # (B, 512)
        out = {"features": features, "logits": features @ self.head.T}  # (B, 1000)
        return tuple(out[name] for name in self.features_list)


def register() -> None:
    """Make `RANDCONV` known to torch-fidelity (idempotent: modules may be imported twice under Dask)."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if RANDCONV not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(RANDCONV, RandomConvFeatures)


with contextlib.suppress(ImportError):  # no torch-fidelity (the GPU check): nothing to register with
    register()


@dataclass(frozen=True)
class ExtractorInfo:
    """What a metric's number was made with: recorded beside every number."""

    name: str
    weights: str  # a path, a URL, or "generated (seed …)"
    weights_sha256: str
    fid_layer: str
    isc_layer: str

    @property
    def comparable(self) -> bool:
        """Only the standard Inception network gives numbers comparable with published FID/IS."""
        return self.name == INCEPTION

    def identity(self) -> dict[str, str]:
        return {"name": self.name, "weights_sha256": self.weights_sha256}


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def inception_weights_path(weights: str | None, cache_dir: str) -> str:
    """A local file with Inception's weights: `weights` itself, its download (http(s):// or an fsspec URL)
    into `cache_dir`, or torch-fidelity's release download when None. One-line error when none works."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    how = (f"download {URL_INCEPTION_V3} where there is network and pass -o eval.inception_weights=PATH "
           f"(or -o eval.extractor={RANDCONV} for offline numbers that are not comparable with published FID)")
    if weights is not None and "://" not in weights:
        if not os.path.isfile(weights):
            raise UserError(f"eval.inception_weights={weights}: no such file; {how}")
        return weights
    url = weights or URL_INCEPTION_V3
    local = Path(cache_dir) / Path(url.split("?")[0]).name
    if local.is_file():
        return str(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_suffix(local.suffix + f".tmp-{os.getpid()}")
    try:
        if url.startswith(("http://", "https://")):
            from torch.hub import download_url_to_file

            download_url_to_file(url, str(tmp), progress=False)
        else:
            import fsspec

            with fsspec.open(url, "rb") as src, open(tmp, "wb") as dst:
                dst.write(src.read())
        os.replace(tmp, local)
    except Exception as exc:  # no network, 403, missing object: all mean "provide the file"
        tmp.unlink(missing_ok=True)
        raise UserError(f"Inception weights: could not fetch {url} ({type(exc).__name__}); {how}") from None
    return str(local)


def build_extractor(name: str, weights: str | None = None, cache_dir: str = "./.nextdetail/weights",
                    device: str = "cpu") -> tuple[FeatureExtractorBase, ExtractorInfo]:
    """The feature extractor `name` on `device` and the record of what it is."""
    if name == RANDCONV:
        model = RandomConvFeatures(RANDCONV, ["features", "logits"])
        info = ExtractorInfo(RANDCONV, f"generated (PCG64 seed {RandomConvFeatures.SEED})", model.weights_sha256(),
                             "features", "logits")
    elif name == INCEPTION:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = inception_weights_path(weights, cache_dir)
        try:
            model = FeatureExtractorInceptionV3(INCEPTION, ["2048", "logits_unbiased"],
                                                feature_extractor_weights_path=path)
        except Exception as exc:
            raise UserError(f"{path}: not Inception-v3-compat weights ({type(exc).__name__}: {exc}); pass the file "
                            f"{INCEPTION_FILE} as -o eval.inception_weights=PATH") from None
        info = ExtractorInfo(INCEPTION, weights or path, _file_sha256(path), "2048", "logits_unbiased")
    else:
        raise UserError(f"eval.extractor={name!r}: unknown; use one of {', '.join(EXTRACTORS)}")
    return model.to(device), info
