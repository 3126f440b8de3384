"""What the configuration derives (`tokenizer.patch_nums: auto`) and how its sections are checked against each
other: each problem names the first stage that cannot run, so a command that stops before it only warns."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from nextdetail.models.configs import VAR_TOKENIZER as T
from nextdetail.models.configs import dyadic_sides

if TYPE_CHECKING:
    from nextdetail.conf.schema import PipelineConfig

VAR_PATCH_NUMS: dict[int, tuple[int, ...]] = {
    16: T.patch_nums,  # VAR-256: its released tokenizer and d16…d30
    32: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),  # VAR-512: VAR's 512 px schedule (CART-512, Table 2)
}
"""VAR's own base-scale schedules, by latent side."""


def derived_patch_nums(latent_side: int, dyadic: bool = False) -> tuple[int, ...]:
    """What `tokenizer.patch_nums: auto` stands for at this latent side: VAR's own schedule at 16 and 32 (unless
    the dyadic pyramid is asked for: NDP's quadtree), else the powers of two below the side, then the side — the
    pyramid 1, 2, 4, … at a power of two. Every schedule increases and ends at the latent side, as the decomposed
    base needs (`cross_problems`)."""
    if latent_side < 1:
        raise ValueError(f"the latent side must be positive, got {latent_side}")
    if not dyadic and latent_side in VAR_PATCH_NUMS:
        return VAR_PATCH_NUMS[latent_side]
    return (*(2**k for k in range(latent_side.bit_length()) if 2**k < latent_side), latent_side)


def auto_patch_nums(cfg: PipelineConfig) -> tuple[int, ...]:
    """What `tokenizer.patch_nums: auto` stands for under this config (before the cross checks)."""
    res, down = cfg.shard.resolution, cfg.tokenizer.downsample
    if res is None or res < down:
        return tuple(T.patch_nums)
    dyadic = cfg.ar.model == "ndp" or cfg.tokenizer.truncation > 0
    return derived_patch_nums(res // down, dyadic=dyadic)


def cross_problems(cfg: PipelineConfig) -> Iterator[tuple[str, str]]:
    """(the first stage that cannot run, why) for each inconsistency between sections."""
    res, down = cfg.shard.resolution, cfg.tokenizer.downsample
    if res is not None and res % down:
        yield "train_tokenizer", f"shard.resolution={res} is not a multiple of the tokenizer's downsampling {down}"
    if res is not None and cfg.tokenizer.patch_nums[-1] > res // down:
        yield "train_tokenizer", (
            f"tokenizer.patch_nums must end at most at the latent side {res // down} (= shard.resolution / {down}),"
            f" not {cfg.tokenizer.patch_nums[-1]} (or set tokenizer.patch_nums=auto)")
    if cfg.tokenizer.order is not None and cfg.tokenizer.order > cfg.decompose.order:
        yield "train_tokenizer", (f"tokenizer.order={cfg.tokenizer.order} needs decompose.order ≥ it "
                                  f"(now {cfg.decompose.order})")
    order = cfg.tokenizer_order
    latent = None if res is None else res // down
    if order >= 1 and latent is not None and cfg.tokenizer.patch_nums[-1] != latent:
        # The base maps are B_n's multi-scale tokens: with one chain per source (`independent`) nothing
        # quantizes the base above its last grid, so what lies between that grid and the latent one is lost
        # for good; with `shared` the detail maps would have to carry it, which is not what they are for.
        yield "train_tokenizer", (
            f"with decomposition order {order} the base scales must end at the latent side {latent} "
            f"(= shard.resolution / {down}), not at {cfg.tokenizer.patch_nums[-1]}: the base maps "
            f"would leave the base unquantized above their last scale; end tokenizer.patch_nums with {latent} "
            f"(e.g. VAR's [1, 2, 3, 4, 5, 6, 8, 10, 13, 16] at 16), or set tokenizer.patch_nums=auto")
    if cfg.ar.model == "ndp" or cfg.tokenizer.truncation > 0:
        what = "ar.model=ndp" if cfg.ar.model == "ndp" else "tokenizer.truncation > 0"
        if cfg.tokenizer.order != 0 or (latent is not None and (latent & (latent - 1) or
                                                                  cfg.tokenizer.patch_nums != list(dyadic_sides(latent)))):
            yield "train_tokenizer" if cfg.tokenizer.truncation > 0 else "train_ar", (
                f"{what} needs a dyadic pyramid tokenizer: tokenizer.order=0 and tokenizer.patch_nums="
                f"{list(dyadic_sides(latent)) if latent and not latent & (latent - 1) else '1, 2, 4, …'}"
                " (`--model ndp` sets both)")
    yield from _training_placement_problems(cfg)


def _training_placement_problems(cfg: PipelineConfig) -> Iterator[tuple[str, str]]:
    """Where the trainings run: the global batch splits evenly over every process of every node (each rank takes an
    equal share), and several nodes are found on a Dask cluster's workers, which a LocalCluster (one host) is not."""
    for stage, section, s in (("train_tokenizer", "tokenizer", cfg.tokenizer), ("train_ar", "ar", cfg.ar)):
        if s.pretrained:  # adopted weights: no training
            continue
        if s.nproc is not None and s.batch_size % (s.nodes * s.nproc):
            yield stage, (f"{section}.batch_size={s.batch_size} does not split over {section}.nodes × {section}.nproc "
                          f"= {s.nodes} × {s.nproc} processes; make {section}.batch_size a multiple of "
                          f"{s.nodes * s.nproc}")
        if s.nodes > 1 and not cfg.dask.address:
            yield stage, (f"{section}.nodes={s.nodes} trains on {s.nodes} hosts found among a Dask cluster's workers: "
                          "set dask.address to its scheduler (`dask scheduler`, `dask worker` on each host), or set "
                          f"{section}.nodes=1")
