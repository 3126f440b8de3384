"""Serving token maps for training from a published token cache (`storage/tokens.py`).

Throughput is decided by how the cache is read: fancy-indexing random rows out of a blosc-compressed
Zarr array decompresses a whole chunk for a few rows (≈ 1 M tokens/s per core here), reading a whole
chunk costs one decompression for all its rows (≈ 100 M). So every read here is a whole chunk (one tar),
and shuffling is blockwise:

- epoch e permutes the chunks with a generator seeded (seed, e) and cuts the permutation into groups
  of `window` chunks; the samples of a group are permuted together. Shards were filled by a hash of
  the key, so a chunk is already a uniform random subset of the dataset: mixing `window` of them per
  group gives batches as varied as a global shuffle at the cost of `window` decoded chunks in memory;
- rank r of W takes groups r, r + W, …: ranks read disjoint chunks and serve disjoint samples; every
  rank serves the same number of batches (the shortest rank's, whole batches), so DDP never waits;
- each sample's stored variant (none / hflip) is drawn per epoch;
- batch b of epoch e is a pure function of (seed, e, r, W, b): loader workers, a resumed run and a
  second machine all see the same batches.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from nextdetail.errors import UserError
from nextdetail.storage.tokens import TokenCache


class TokenDataset(torch.utils.data.Dataset):
    """The images of one split, random access: item i → (tokens (variants, L) int64, class index)."""

    def __init__(self, cache: TokenCache, split: str, max_chunks: int = 8) -> None:
        import pyarrow.compute as pc

        index = cache.index()
        table = index.filter(pc.equal(index["split"], split))
        if table.num_rows == 0:
            raise UserError(f"{cache.cache.url()}: no {split!r} images in this token cache (splits: "
                            f"{sorted(set(index['split'].to_pylist()))})")
        self.cache, self.split, self.max_chunks = cache, split, max_chunks
        shards = table["shard"].to_pylist()
        self.tars = list(dict.fromkeys(shards))  # chunk c = tar c
        tar_id = {t: c for c, t in enumerate(self.tars)}
        chunk_of = np.array([tar_id[t] for t in shards], dtype=np.int64)
        row_of = table["row"].to_numpy().astype(np.int64)
        order = np.lexsort((row_of, chunk_of))  # sample i: chunk-major, then row order
        self.chunk_of, self.row_of = chunk_of[order], row_of[order]
        self.labels = table["class_index"].to_numpy().astype(np.int64)[order]
        self.keys = table["key"].take(order)  # arrow strings: sample i's key is keys[i]
        self.chunk_sizes = np.bincount(self.chunk_of, minlength=len(self.tars))
        self.chunk_starts = np.concatenate([[0], np.cumsum(self.chunk_sizes)])
        self._chunks: OrderedDict[int, np.ndarray] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:  # to loader workers: no decoded chunks
        return {**self.__dict__, "_chunks": OrderedDict()}

    def __len__(self) -> int:
        return len(self.chunk_of)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        chunk = self.chunk(int(self.chunk_of[i]))
        return torch.from_numpy(chunk[self.row_of[i]].astype(np.int64)), int(self.labels[i])

    @property
    def tokens_per_image(self) -> int:
        return self.cache.tokens_per_image

    def chunk(self, c: int) -> np.ndarray:
        """Chunk c decoded whole: (images, variants, L) uint16; the `max_chunks` most recent kept."""
        if c in self._chunks:
            self._chunks.move_to_end(c)
            return self._chunks[c]
        array = self.cache.read(self.split, self.tars[c])
        self._chunks[c] = array
        while len(self._chunks) > self.max_chunks:
            self._chunks.popitem(last=False)
        return array


class _EpochSampler(torch.utils.data.Sampler):
    """Yields (epoch, batch) for the batches of the current epoch; `epoch` is set before each iteration
    (it runs in the main process, so persistent loader workers need no notice)."""

    def __init__(self, batches: TokenBatches) -> None:
        self.batches, self.epoch, self.start = batches, 0, 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, b) for b in range(self.start, self.batches.batches_per_epoch))

    def __len__(self) -> int:
        return self.batches.batches_per_epoch - self.start


class TokenBatches(torch.utils.data.Dataset):
    """Training batches of one split for rank `rank` of `world`: item (epoch, b) → (tokens (B, L) int64,
    labels (B,) int64). `epoch(e)` iterates one epoch, in `workers` loader processes if > 0."""

    def __init__(self, cache: TokenCache, split: str, batch_size: int, seed: int = 0, window: int = 4,
                 rank: int | None = None, world: int | None = None) -> None:
        if rank is None or world is None:
            dist = torch.distributed
            ready = dist.is_available() and dist.is_initialized()
            rank, world = (dist.get_rank(), dist.get_world_size()) if ready else (0, 1)
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        self.data = TokenDataset(cache, split, max_chunks=window + 1)
        chunks = len(self.data.tars)
        if chunks < world:
            raise UserError(f"{split}: {chunks} tars cannot be split over {world} ranks; shard into at least "
                            f"{world} tars (shard.shard_count)")
        self.window = max(1, min(window, chunks // world))
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self._plan: tuple[int, np.ndarray, np.ndarray] | None = None
        self._loader: Any = None
        self._served: int | None = None  # samples each epoch serves: epoch 0's, set below
        self.batches_per_epoch = len(self.plan(0)[0]) // batch_size
        self._served = self.batches_per_epoch * batch_size
        if self.batches_per_epoch == 0:
            raise UserError(f"{split}: too few images per rank for batch_size={batch_size} with {world} ranks")

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_plan": None, "_loader": None, "_sampler": None}

    def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's samples for `epoch` in serving order, and each sample's variant (all ranks equal length)."""
        if self._plan is None or self._plan[0] != epoch:
            d = self.data
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(len(d.tars))
            groups = [order[i : i + self.window] for i in range(0, len(order), self.window)]
            sizes = [int(d.chunk_sizes[g].sum()) for g in groups]
            per_rank = min(sum(sizes[r :: self.world]) for r in range(self.world))
            n = per_rank // self.batch_size * self.batch_size
            mine = []
            for gi in range(self.rank, len(groups), self.world):
                ids = np.concatenate([np.arange(d.chunk_starts[c], d.chunk_starts[c + 1]) for c in groups[gi]])
                mine.append(np.random.default_rng([self.seed, epoch, gi]).permutation(ids))
            if self._served is not None:
                # Every epoch serves epoch 0's number of batches (step s's batch is a pure function of s). With
                # several ranks an epoch's tar groups can leave a rank fewer samples than epoch 0 did: it starts its
                # own samples over instead of serving short or empty batches.
                n = self._served
            samples = np.resize(np.concatenate(mine), n)
            variants = np.random.default_rng([self.seed, epoch, 1 << 30]).integers(
                len(d.cache.variants), size=len(d))[samples]
            self._plan = (epoch, samples, variants)
        return self._plan[1], self._plan[2]

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, b = item
        samples, variants = self.plan(epoch)
        ids = samples[b * self.batch_size : (b + 1) * self.batch_size]
        var = variants[b * self.batch_size : (b + 1) * self.batch_size]
        d = self.data
        chunk_of, rows = d.chunk_of[ids], d.row_of[ids]
        out = np.empty((len(ids), d.tokens_per_image), dtype=np.int64)  # (B, L)
        for c in np.unique(chunk_of):
            sel = np.flatnonzero(chunk_of == c)
            out[sel] = d.chunk(int(c))[rows[sel], var[sel]]  # (b_c, L) gathered from (images, variants, L)
        return torch.from_numpy(out), torch.from_numpy(d.labels[ids])

    def epoch(self, epoch: int, workers: int = 0, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches start … batches_per_epoch − 1 of `epoch`, in order."""
        if workers == 0:
            return (self[(epoch, b)] for b in range(start, self.batches_per_epoch))
        if self._loader is None or self._loader.num_workers != workers:
            from torch.utils.data import DataLoader

            # spawn: the parent may run Prefect's threads; persistent: workers keep their decoded chunks
            self._sampler = _EpochSampler(self)
            self._loader = DataLoader(self, batch_size=None, sampler=self._sampler, num_workers=workers,
                                      multiprocessing_context="spawn", persistent_workers=True, prefetch_factor=4)
        self._sampler.epoch, self._sampler.start = epoch, start
        return iter(self._loader)
