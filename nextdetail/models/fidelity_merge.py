"""The metrics of `evaluate`'s merge: a checkpoint's gathered features against the reference statistics, with the
same values as `fidelity.compare` (torch-fidelity's own functions in one call, one thread), computed faster:

- the real set's k-NN radii come from the reference statistics (`knn_radii`, computed once per reference when
  they are made) instead of from the real × real distances per checkpoint (`precision_recall`);
- KID's subsets run over the cores beside FID, IS and precision / recall (`kid_subsets`).

Apart from `fidelity.py` so that what imports that one (the sample stage's seam bands, the tokenizer's rFID) keeps
its code identity when the merge changes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from typing import Any

import numpy as np
import torch

from nextdetail.models import fidelity


def compare(fake: dict[str, np.ndarray], real_features: np.ndarray, real_stats: dict[str, np.ndarray],
            metrics: list[str], protocol: dict[str, Any], pool: Executor | None = None) -> dict[str, Any]:
    """Generated set `fake` ({"fid", "isc"} features) against the real set (its FID-layer features and their
    statistics: "mu", "sigma", and "knn", `knn_radii` of the features, if known). Returns {"fid", "isc_mean",
    "isc_std", "kid_mean", "kid_std", "kid_subset_size", "precision", "recall", "f_score"} for the `metrics` asked
    for. With `pool`, KID's subsets run in it while this thread computes the others (the same values)."""
    f1 = torch.from_numpy(np.asarray(fake["fid"], dtype=np.float32))
    f2 = torch.from_numpy(np.asarray(real_features, dtype=np.float32))
    kid_size = min(protocol["kid_subset_size"], len(f1), len(f2))  # torch-fidelity refuses a subset > a set
    kid_mmds = kid_subsets(f1, f2, protocol["kid_subsets"], kid_size, protocol["rng_seed"], pool) \
        if "kid" in metrics else None
    out = fidelity.compare(fake, real_features, real_stats, [m for m in metrics if m in ("fid", "isc")], protocol)
    if "prc" in metrics:
        k, knn = protocol["prc_neighborhood"], real_stats.get("knn")
        real_radii = torch.from_numpy(knn[:, k - 1]) if knn is not None and k <= knn.shape[1] else None
        precision, recall = precision_recall(f1, f2, k, real_radii)
    if kid_mmds is not None:
        mmds = kid_mmds()
        out.update(kid_mean=float(np.mean(mmds)), kid_std=float(np.std(mmds)), kid_subset_size=kid_size)
    if "prc" in metrics:
        f_score = 2 * precision * recall / max(1e-5, precision + recall)  # torch-fidelity's own
        out.update(precision=precision, recall=recall, f_score=f_score)
    return out


def kid_subsets(fake: torch.Tensor, real: torch.Tensor, subsets: int, subset_size: int, rng_seed: int,
                pool: Executor | None = None) -> Callable[[], np.ndarray]:
    """KID's per-subset MMDs (float64, as torch-fidelity collects them), computed as its `kid_features_to_metric`
    computes them: the same subsets, drawn from its RNG in its order, each by its `kernel_mmd`. With `pool`, they
    start there now, in one chunk per core (the merge's longest part on a cluster: 100
    subsets of numpy); the returned function waits for them. Without, it computes them."""
    from torch_fidelity.metric_kid import kernel_mmd

    a, b = fake.numpy(), real.numpy()
    rng = np.random.RandomState(rng_seed)
    draws = [(rng.choice(len(a), subset_size, replace=False), rng.choice(len(b), subset_size, replace=False))
             for _ in range(subsets)]

    def mmds(chunk: list[tuple[np.ndarray, np.ndarray]]) -> list[float]:
        return [kernel_mmd(a[i], b[j]) for i, j in chunk]

    def gathered(chunks: list[list[float]]) -> np.ndarray:
        out = np.zeros(subsets)
        out[:] = [m for chunk in chunks for m in chunk]
        return out

    if pool is None:
        return lambda: gathered([mmds(draws)])
    n = min(subsets, os.cpu_count() or 1)
    futures = [pool.submit(mmds, draws[c * subsets // n : (c + 1) * subsets // n]) for c in range(n)]
    return lambda: gathered([f.result() for f in futures])


# torch-fidelity's block size for its k-NN distances: rows of one `torch.cdist` call
PRC_BATCH = 10000
KNN_MOST = 10  # the reference statistics keep the real set's k-NN radii for k = 1 … KNN_MOST


def knn_radii(features: np.ndarray, most: int = KNN_MOST) -> np.ndarray:
    """(N, min(most, N - 1)) float32: column k - 1 holds each row's distance to its k-th nearest other row, the
    radius `prc_neighborhood` = k gives it in precision / recall: torch-fidelity's `kthvalue(k + 1)` (the row
    itself is the first) of the same distances (`_smallest`), so the same values. The reference statistics keep
    these for the real set (`reference_stats`): computed once per reference, not once per evaluated checkpoint. At
    ImageNet with the train split as reference that is 1.28 M² distances against 50 k × 1.28 M for a checkpoint's
    samples: most of precision / recall's time."""
    f = torch.from_numpy(np.asarray(features, dtype=np.float32))
    columns = min(most, len(f) - 1)
    if columns < 1:
        return np.zeros((len(f), 0), dtype=np.float32)
    return torch.cat([_smallest(block, f, columns + 1)[:, 1:] for block in f.split(PRC_BATCH)]).numpy()


def _distance_batches(rows: torch.Tensor, columns: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
    """torch-fidelity's `calc_cdist_part(rows, columns, PRC_BATCH)` one column batch at a time — the same
    `torch.cdist` calls, so the same values — never the whole (rows × N) matrix: 51 GB for a block of 10 000 rows
    against ImageNet's 1.28 M train images, 400 MB a batch."""
    for start in range(0, len(columns), PRC_BATCH):
        yield slice(start, start + PRC_BATCH), torch.cdist(rows, columns[start : start + PRC_BATCH]).cpu()


def _smallest(rows: torch.Tensor, columns: torch.Tensor, count: int) -> torch.Tensor:
    """(len(rows), count), ascending: each row's `count` smallest distances to `columns` — those of its whole
    `calc_cdist_part` row (the k smallest of a union are the k smallest of each part's k smallest)."""
    best = torch.empty(len(rows), 0)
    for _, distances in _distance_batches(rows, columns):
        both = torch.cat([best, distances.topk(min(count, distances.shape[1]), dim=1, largest=False).values], dim=1)
        best = both.topk(min(count, both.shape[1]), dim=1, largest=False).values
    return best


def _inside_any(rows: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """(len(rows),) float: 1 where a row lies within some centre's radius — `(calc_cdist_part(rows, centres) <=
    radii).any(dim=1)`, batch by batch."""
    inside = torch.zeros(len(rows), dtype=torch.bool)
    for cols, distances in _distance_batches(rows, centres):
        inside |= (distances <= radii[cols]).any(dim=1)
    return inside.float()


def precision_recall(fake: torch.Tensor, real: torch.Tensor, neighborhood: int,
                     real_radii: torch.Tensor | None = None, save_cpu_ram: bool | None = None) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al.) of the generated set `fake` against `real`, both
    (N, D) float32: torch-fidelity's `prc_features_to_metric` — the same distance blocks, the same comparisons,
    the same values — except that the real set's k-NN radii come from `real_radii` ((N_real,), `knn_radii`'s
    column `neighborhood` - 1) when given, and that its block-by-block way (`save_cpu_ram`) holds one column batch
    of a block's distances at a time. `save_cpu_ram`: torch-fidelity's two ways (by blocks of rows, or the whole
    distance matrix: its precision compares the transposed matrix); default as `compare` chooses."""
    from torch_fidelity.metric_prc import calc_cdist_full

    if save_cpu_ram is None:
        save_cpu_ram = len(fake) * len(real) > 1e8

    def radii(features: torch.Tensor) -> torch.Tensor:
        if save_cpu_ram:
            return torch.cat([_smallest(block, features, neighborhood + 1)[:, neighborhood]
                              for block in features.split(PRC_BATCH)])
        return calc_cdist_full(features, features, PRC_BATCH).kthvalue(neighborhood + 1).values

    fake_radii = radii(fake)
    real_radii = radii(real) if real_radii is None else real_radii
    if save_cpu_ram:
        # Recall: is each real row inside some generated row's ball; precision: each generated row in a real one's
        recall = torch.cat([_inside_any(block, fake, fake_radii) for block in real.split(PRC_BATCH)]).mean().item()
        precision = torch.cat([_inside_any(block, real, real_radii) for block in fake.split(PRC_BATCH)]).mean().item()
    else:
        real_to_fake = calc_cdist_full(real, fake, PRC_BATCH)
        recall = (real_to_fake <= fake_radii).any(dim=1).float().mean().item()
        fake_to_real = real_to_fake.T  # torch-fidelity's: the same values as the other way's blocks, or not
        precision = (fake_to_real <= real_radii).any(dim=1).float().mean().item()
    return precision, recall
