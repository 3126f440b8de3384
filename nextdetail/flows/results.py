"""What each stage hands downstream: its artifact's location, identity and summary (one dataclass per stage).

Kept apart from the flows (and free of torch) so an up-to-date stage's result is rebuilt from its lineage
record without importing the code that computes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ShardResult:
    url: str  # the shard directory
    identity: str  # the dataset's identity (what downstream stages key on)
    summary: dict[str, Any]
    shards_ran: list[str] = field(default_factory=list)  # tars written by this run
    shards_reused: list[str] = field(default_factory=list)  # found complete (their marker says so)
    manifest_work: str = "ran"  # ran | reused | up to date (this run skipped the stage)
    tar_identities: dict[str, str] = field(default_factory=dict)  # tar name → its artifact identity
    seconds: float = 0.0

    @property
    def manifest_url(self) -> str:
        return f"{self.url}/manifest.parquet"


@dataclass
class DecomposeResult:
    url: str  # the decomposition directory (factors.zarr, index.parquet)
    identity: str
    summary: dict[str, Any]
    tars_ran: list[str] = field(default_factory=list)
    tars_reused: list[str] = field(default_factory=list)
    index_work: str = "ran"
    seconds: float = 0.0

    @property
    def zarr_url(self) -> str:
        return f"{self.url}/factors.zarr"


@dataclass
class StageResult:
    """A stage with one artifact: where it is, its identity, its summary, and what this run did for it."""

    url: str
    identity: str
    summary: dict[str, Any]
    work: str = "ran"  # ran | reused | rebuilt (token cache) | up to date (this run skipped the stage)
    seconds: float = 0.0


@dataclass
class TokenizerResult(StageResult):  # url: tokenizer.pt, metrics.json, curves.png, reconstructions.png, checkpoints/
    @property
    def checkpoint_url(self) -> str:
        return f"{self.url}/tokenizer.pt"


@dataclass
class TokensResult(StageResult):  # url: the cache directory <cache root>/tokens/<identity>
    options: dict | None = None  # fsspec options of the cache root
    local_cache: str | None = None

    def open(self) -> Any:
        """The published cache (storage.tokens.TokenCache), read in place (local) or through the local mirror."""
        from nextdetail.storage import tokens

        return tokens.TokenCache(self.url, self.options, self.local_cache)


@dataclass
class ARResult(StageResult):  # url: transformer.pt, best.pt, metrics.csv, loss.png, summary.json, checkpoints/
    @property
    def checkpoint_url(self) -> str:
        return f"{self.url}/transformer.pt"


@dataclass
class SampleResult(StageResult):  # url: grid.png, grids/, images/, samples.tar, hires/, summary.json
    pass


@dataclass
class EvalResult(StageResult):  # url: report.md, metrics.json, grid.png, grids/, curves.png, samples/
    reference: dict[str, Any] | None = None  # url, identity, work of the reference statistics

    @property
    def report_url(self) -> str:
        return f"{self.url}/report.md"
