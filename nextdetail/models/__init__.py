"""torch models: the Ambrosio–Tortorelli solver, the base/detail tokenizer, the transformers and samplers.

Added by issues 4 (solver), 5 (tokenizer), 7 (CART transformer) and 9 (NDP); one concept per file.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Family:
    """A model (`ar.model`) as the two modules that implement it. `model` exports `Config`, `Model` and `loss`
    (its training objective, one signature for every family, nanoGPT's rule: the model owns its loss);
    `sampler` exports `from_config`."""

    model: str  # what train_ar trains
    sampler: str  # what sample and evaluate run


FAMILIES: dict[str, Family] = {
    "cart": Family("nextdetail.models.transformer", "nextdetail.models.sampler"),
    "ndp": Family("nextdetail.models.ndp", "nextdetail.models.ndp_sampler"),
}
"""The one place that says which code a model runs: the tasks import these modules by name, and the stage
table derives the model's code fingerprint from the same names (so an edit to NDP's sampler re-samples NDP
only, never CART)."""


def family(kind: str, part: str) -> ModuleType:
    """The `part` ("model" | "sampler") module of model `kind`, imported."""
    return importlib.import_module(getattr(FAMILIES[kind], part))


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `n` for the block (None: unchanged), restored after — a Dask worker's task
    takes its share of the machine's cores, not all of them."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
