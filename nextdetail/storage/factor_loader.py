"""Training batches of the tokenizer stage from the shard tars and the cached decomposition (the factor-side
twin of `token_loader.py`): batch s is a pure function of (seed, s), so a resumed run needs no replay."""

from __future__ import annotations

import io
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nextdetail.errors import UserError
from nextdetail.storage import factors
from nextdetail.storage.fs import Store
from nextdetail.storage.shards import read_tar_bytes


@dataclass(frozen=True)
class TrainData:
    """What the stage reads: the shard tars (images) and the decomposition (factors), one split."""

    shards_url: str
    factors_url: str | None  # the decomposition directory (factors.zarr, index.parquet); None: order 0, no factors
    options: dict
    image_format: str
    split: str
    tars: tuple[tuple[str, int], ...]  # (tar, images) in index order

    def index(self) -> Any:
        """key, split, shard, row, class_index of every image: the decomposition's index, or at order 0 the same
        rows derived from the shard manifest (`manifest.sample_index`)."""
        return read_sample_index(self.shards_url, self.factors_url, self.options)


def read_sample_index(shards_url: str, factors_url: str | None, options: dict) -> Any:
    """The images a training or encoding stage reads, by tar and row (see `TrainData.index`)."""
    from nextdetail.storage.manifest import read_table, sample_index

    if factors_url is not None:
        return factors.read_index(Store(factors_url, options))
    return sample_index(read_table(Store(shards_url, options), "manifest.parquet"))


class FactorBatches:
    """Batch s (images (B, 3, H, W), bases (n, B, 3, H, W), both in [-1, 1]) as a pure function of
    (seed, s): resuming at step s needs no replay. Each epoch visits every image once (the last
    partial batch is dropped); tars are read whole, the two most recent kept in memory."""

    def __init__(self, data: TrainData, order: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        from PIL import Image  # noqa: F401  (fail here, not in the loop)

        if batch_size % world:
            raise UserError(f"tokenizer.batch_size={batch_size} does not split over {world} processes; "
                            "make it a multiple of tokenizer.nproc")
        self.data, self.order, self.batch_size, self.seed = data, order, batch_size, seed
        self.rank, self.world = rank, world  # rank r builds its contiguous B/W slice of every global batch
        self.shards = Store(data.shards_url, data.options)
        self._group: Any = None  # opened on first use, in each loader worker of its own
        index = data.index()
        keys: dict[str, list[str]] = {}
        for row in index.select(["shard", "row", "key", "split"]).to_pylist():
            if row["split"] == data.split:
                keys.setdefault(row["shard"], []).append((row["row"], row["key"]))
        self.keys = {tar: [k for _, k in sorted(v)] for tar, v in keys.items()}
        self.sizes = np.array([n for _, n in data.tars])
        self.total = int(self.sizes.sum())
        if self.total < batch_size:
            raise UserError(f"{data.split}: {self.total} images, fewer than tokenizer.batch_size={batch_size}; "
                            "lower the batch size or add data")
        self.steps_per_epoch = self.total // batch_size
        self._epoch: tuple[int, np.ndarray, list[np.ndarray], np.ndarray] | None = None
        self._tars: OrderedDict[str, tuple[dict[str, bytes], Any]] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:  # to loader workers: no open handles, no cached tars
        return {**self.__dict__, "_group": None, "_tars": OrderedDict(), "_epoch": None}

    def __len__(self) -> int:  # a map-style dataset of batches: item s is batch s
        return 2**62

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.batch(step)

    def iterate(self, start: int, stop: int, workers: int) -> Any:
        """Batches start … stop − 1 in order; with `workers` > 0 built ahead in loader processes
        (the same batches: each is a function of its step alone)."""
        if workers == 0:
            return (self.batch(s) for s in range(start, stop))
        from torch.utils.data import DataLoader

        # spawn, not fork: the parent runs Prefect's and Zarr's threads, which a forked child would lack
        return iter(DataLoader(self, batch_size=None, sampler=range(start, stop), num_workers=workers,
                               prefetch_factor=4, multiprocessing_context="spawn",
                               generator=torch.Generator().manual_seed(0)))  # never draws from the global RNG

    def position(self, step: int) -> dict[str, int]:
        return {"epoch": step // self.steps_per_epoch, "batch_in_epoch": step % self.steps_per_epoch}

    def _plan(self, epoch: int) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        if self._epoch is None or self._epoch[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            tar_order = rng.permutation(len(self.sizes))
            rows = [rng.permutation(int(self.sizes[t])) for t in tar_order]
            starts = np.concatenate([[0], np.cumsum(self.sizes[tar_order])])
            self._epoch = (epoch, tar_order, rows, starts)
        return self._epoch[1:]

    def _tar(self, t: int) -> tuple[dict[str, bytes], Any]:
        tar = self.data.tars[t][0]
        if tar not in self._tars:
            array = None
            if self.order:
                store = Store(self.data.factors_url, self.data.options)
                if self._group is None:
                    self._group = factors.open_group(store)
                array = factors.open_array(store, self._group, self.data.split, tar)
            self._tars[tar] = (read_tar_bytes(self.shards, tar, self.data.image_format), array)
            while len(self._tars) > 2:
                self._tars.popitem(last=False)
        return self._tars[tar]

    def sample(self, t: int, row: int) -> tuple[np.ndarray, np.ndarray]:
        from PIL import Image

        images, array = self._tar(t)
        key = self.keys[self.data.tars[t][0]][row]
        with Image.open(io.BytesIO(images[key])) as im:
            image = np.asarray(im.convert("RGB")).transpose(2, 0, 1)  # (3, H, W) uint8
        bases = factors.read(array, (row, slice(None, self.order))) if self.order else None  # (n, 3, H, W) float32
        return image, bases

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        pos = self.position(step)
        tar_order, rows, starts = self._plan(pos["epoch"])
        local = self.batch_size // self.world
        first = pos["batch_in_epoch"] * self.batch_size + self.rank * local
        images, bases = [], []
        for p in range(first, first + local):
            j = int(np.searchsorted(starts, p, side="right") - 1)  # which tar of this epoch's order
            image, base = self.sample(int(tar_order[j]), int(rows[j][p - starts[j]]))
            images.append(image)
            bases.append(base)
        x = torch.from_numpy(np.stack(images)).float().div_(127.5).sub_(1)  # (B, 3, H, W) in [-1, 1]
        if not self.order:
            return x, None
        b = torch.from_numpy(np.stack(bases, axis=1)).mul_(2).sub_(1)  # (n, B, 3, H, W) in [-1, 1]
        return x, b
