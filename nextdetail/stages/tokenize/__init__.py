"""The `tokenize` stage: every image (and its factors) through the trained tokenizer → a published token
cache (Zarr v3, index, a marker listing every file's sha256), verified before every reuse. Flow: `flow.py`."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from nextdetail.conf.schema import PipelineConfig
from nextdetail.pipeline.declaration import Stage
from nextdetail.pipeline.result import UP_TO_DATE, StageResult


def cache_root(cfg: PipelineConfig) -> tuple[str, dict[str, Any]]:
    """Where token caches live: `tokens.cache` (with `tokens.cache_options`), else storage.root."""
    options = cfg.tokens.cache_options if cfg.tokens.cache_options is not None else cfg.storage.options
    return cfg.tokens.cache or cfg.storage.root, dict(options)


def verify_cache(cfg: PipelineConfig, store: Any) -> list[str]:
    """The files of a published cache that fail their sha256 (`tokens.verify=sha256`, as the flow checks before
    every use: a same-size corruption is caught too); none with `tokens.verify=size`."""
    if cfg.tokens.verify != "sha256":
        return []
    from nextdetail.storage.tokens import TokenCache

    return TokenCache(store.url(), store.options, cfg.tokens.local_cache).verify()


@dataclass
class TokensResult(StageResult):  # url: the cache directory <cache root>/tokens/<identity>
    options: dict | None = None  # fsspec options of the cache root
    local_cache: str | None = None

    def up_to_date(self, cfg: Any) -> TokensResult:
        """How to read the cache comes from this run's config: records never hold storage options."""
        return replace(self, work=UP_TO_DATE, seconds=0.0, options=cache_root(cfg)[1],
                       local_cache=cfg.tokens.local_cache)

    def open(self) -> Any:
        """The published cache (storage.tokens.TokenCache), read in place (local) or through the local mirror."""
        from nextdetail.storage import tokens

        return tokens.TokenCache(self.url, self.options, self.local_cache)

    @staticmethod
    def describe(summary: dict) -> str:
        return (f"tokenize: {summary['images']} images × {len(summary['variants'])} variants "
                f"({', '.join(summary['variants'])}) → {summary['token_maps']} token maps, "
                f"{summary['tokens_per_image']} tokens per image; encoded {summary['encoded_images']}, "
                f"adopted {summary['copied_parts']} tars from an earlier attempt")

    def outputs(self) -> list[tuple[str, str]]:
        attempt = self.summary["attempt"]
        return [("cache", f"{self.url}   (Zarr v3 {attempt}/tokens.zarr, index.parquet, _COMPLETE.json with every "
                          "file's sha256)"),
                ("picture", f"{self.url}/{attempt}/preview.png   (images over their decoded cached tokens)")]


STAGE = Stage("tokenize", "tokens", ("shard", "decompose", "train_tokenizer"),
              lambda c: {"tokens": c.tokens.identity_settings()}, TokensResult, content_sha256="content_sha256",
              storage=cache_root, storage_setting="tokens.cache", verify=verify_cache, marker_lists_files=True,
              dask=lambda c: c.tokens.resources is not None,
              resources=lambda c: ("tokens.resources", c.tokens.resources),
              command_help="shards + factors + tokenizer → the shared token cache (Zarr, by identity)",
              command_description=("Run the stages up to tokenize: every image's token maps under "
                                   "<tokens.cache or storage.root>/tokens/<identity>/. A complete cache with the same "
                                   "identity there (e.g. a team bucket: -o tokens.cache=s3://bucket/prefix) is verified "
                                   "and reused instead of encoding."))
