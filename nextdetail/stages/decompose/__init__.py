"""The `decompose` stage: every shard tar's images → base factors B_1…B_n by repeated Ambrosio–Tortorelli
smoothing (CART §3.1), one Zarr array per tar, and an index. Flow: `flow.py`; tasks: `tasks.py`."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from nextdetail.pipeline.declaration import Stage
from nextdetail.pipeline.result import UP_TO_DATE, StageResult


@dataclass
class DecomposeResult(StageResult):  # url: the decomposition directory (factors.zarr, index.parquet)
    tars_ran: list[str] = field(default_factory=list)
    tars_reused: list[str] = field(default_factory=list)
    index_work: str = "ran"

    @property
    def zarr_url(self) -> str:
        return f"{self.url}/factors.zarr"

    @staticmethod
    def describe(summary: dict) -> str:
        return (f"decompose: {summary['images']} images in {summary['tars']} tars → base factors B_1…B_n "
                f"(mean {summary['mean_outer_iterations']} alternations per order)")

    def outputs(self) -> list[tuple[str, str]]:
        return [("factors", f"{self.zarr_url}   (Zarr v3, one array per tar: images × order × 3 × H × W)"),
                ("index", f"{self.url}/index.parquet")]

    def next_steps(self) -> list[str]:
        key = self.summary.get("first_key")
        return [f"look at one: nextdetail show decomposition {key}"] if key and self.work != UP_TO_DATE else []

    def work_line(self) -> str:
        return (f"identity: {self.identity[:16]}   this run decomposed {len(self.tars_ran)} tars, reused "
                f"{len(self.tars_reused)} ({self.seconds:.1f}s)")

    def up_to_date(self, cfg: Any) -> DecomposeResult:
        return replace(self, work=UP_TO_DATE, tars_ran=[], tars_reused=[], index_work=UP_TO_DATE, seconds=0.0)


STAGE = Stage("decompose", "factors", ("shard",), lambda c: {"decompose": c.decompose.identity_settings()},
              DecomposeResult, needed=lambda c: c.tokenizer_order > 0, dask=True, content_sha256="content_sha256",
              command_help="shard tars → base/detail factors (Ambrosio–Tortorelli) in Zarr",
              command_description=("Run the stages up to decompose: B_1…B_n per image under <storage.root>/factors/ "
                                   "(settings: -o decompose.alpha=… etc.)."))
