"""The embedded dataset: real photographs that ship inside scikit-image, as a class-folder dataset.

One class per source photo; each image is a deterministic random square crop (side between
`min_crop` and 1 of the photo's shorter side, anywhere in the photo) resized to `image_size`.
Greyscale photos stay greyscale on disk, so the `shard` stage's conversion path is exercised by
real data. Same settings → byte-identical files; a finished build is reused, never rewritten.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable

import numpy as np
from PIL import Image

from nextdetail.conf.schema import EmbeddedConfig
from nextdetail.storage.fs import Store
from nextdetail.storage.hashing import canonical_json, stable_hash


def _photos() -> dict[str, Callable[[], np.ndarray]]:
    import skimage.data as d  # imported lazily: skimage is slow to import

    return {
        "astronaut": d.astronaut,
        "brick": d.brick,
        "camera": d.camera,
        "chelsea": d.chelsea,
        "coffee": d.coffee,
        "grass": d.grass,
        "gravel": d.gravel,
        "hubble_deep_field": d.hubble_deep_field,
        "immunohistochemistry": d.immunohistochemistry,
        "motorcycle": lambda: d.stereo_motorcycle()[0],
        "retina": d.retina,
        "rocket": d.rocket,
    }


CLASSES: tuple[str, ...] = tuple(sorted(
    ["astronaut", "brick", "camera", "chelsea", "coffee", "grass", "gravel", "hubble_deep_field",
     "immunohistochemistry", "motorcycle", "retina", "rocket"]
))


def embedded_identity(cfg: EmbeddedConfig) -> str:
    from nextdetail.pipeline.code import code_fingerprint

    return stable_hash({"embedded": cfg.model_dump(), "code": code_fingerprint([__name__])})


def embedded_location(store: Store, cfg: EmbeddedConfig) -> Store:
    """Where the build for these settings lives under the storage root."""
    return store.sub("sources", f"embedded-{cfg.image_size}px-{embedded_identity(cfg)[:12]}")


def _crops(photo: np.ndarray, n: int, cfg: EmbeddedConfig, rng: np.random.Generator) -> list[bytes]:
    image = Image.fromarray(photo)
    short = min(image.size)
    out = []
    for _ in range(n):
        side = max(8, round(short * rng.uniform(cfg.min_crop, 1.0)))
        left = int(rng.integers(0, image.width - side + 1))
        top = int(rng.integers(0, image.height - side + 1))
        crop = image.crop((left, top, left + side, top + side))
        crop = crop.resize((cfg.image_size, cfg.image_size), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        if cfg.image_format == "png":
            crop.save(buf, format="PNG", compress_level=6)
        else:
            crop.save(buf, format="JPEG", quality=95)
        out.append(buf.getvalue())
    return out


def build_embedded(store: Store, cfg: EmbeddedConfig, log: Callable[[str], None] = print) -> Store:
    """Build (or reuse) the embedded dataset under `store`; returns the dataset's root."""
    out = embedded_location(store, cfg)
    identity = embedded_identity(cfg)
    if out.exists("_COMPLETE.json"):
        return out
    t0 = time.time()
    photos = _photos()
    ext = cfg.image_format
    for class_index, name in enumerate(CLASSES):
        photo = photos[name]()
        # One generator per class: adding classes or changing per_class of one never moves another's crops.
        rng = np.random.default_rng([cfg.seed, class_index])
        crops = _crops(photo, cfg.per_class + cfg.val_per_class, cfg, rng)
        for i, data in enumerate(crops):
            split = "train" if i < cfg.per_class else "val"
            out.write_bytes(f"{split}/{name}/{name}_{i:05d}.{ext}", data)
    n = len(CLASSES) * (cfg.per_class + cfg.val_per_class)
    marker = {"identity": identity, "settings": cfg.model_dump(), "classes": list(CLASSES), "images": n}
    out.write_bytes("_COMPLETE.json", canonical_json(marker).encode())
    log(f"embedded dataset: {n} images in {len(CLASSES)} classes → {out.url()} ({time.time() - t0:.1f}s)")
    return out
