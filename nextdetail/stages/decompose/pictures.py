"""Pictures of a decomposition (`nextdetail show decomposition`): per image a strip I, B_1…B_n, D_1…D_n (CART
Fig. 3). Reads the published factors and shards; writes nothing under the root. Not part of the stage's code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nextdetail.errors import UserError


def write_strips(cfg: Any, decomposition: Any, shards: Any, keys: list[str], out_dir: Path) -> list[Path]:
    """One PNG per key (the manifest's `key` column) under `out_dir`; one line naming an example on an unknown key."""
    from nextdetail.figures import decomposition_strip, safe_name, write_png
    from nextdetail.storage.factors import open_array, open_group, read, read_index
    from nextdetail.storage.fs import Store
    from nextdetail.storage.shards import read_tar_images

    store = Store(decomposition.url, cfg.storage.options)
    index = {r["key"]: r for r in read_index(store).to_pylist()}
    missing = [k for k in keys if k not in index]
    if missing:
        example = next(iter(index), "?")
        raise UserError(f"key {missing[0]!r} is not in {decomposition.url}/index.parquet (e.g. {example!r}); "
                        "keys are the manifest's `key` column")
    group = open_group(store)
    written = []
    for key in keys:
        row = index[key]
        bases = read(open_array(store, group, row["split"], row["shard"]), row["row"])  # (n, 3, H, W) float32
        image = read_tar_images(Store(shards.url, cfg.storage.options), row["shard"], (key,),
                                cfg.shard.image_format)[0].transpose(2, 0, 1).astype("float32") / 255
        path = out_dir / f"decomposition-{safe_name(key)}.png"
        write_png(path, decomposition_strip(image, bases))
        written.append(path)
    return written
