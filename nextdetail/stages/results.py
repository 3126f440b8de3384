"""What each stage hands downstream: its artifact's location, identity and summary (one dataclass per stage).

Kept apart from the flows (and free of torch) so an up-to-date stage's result is rebuilt from its lineage
record without importing the code that computes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from nextdetail.storage.labels import checkpoint_name

UP_TO_DATE = "up to date"  # the work of a stage this run skipped: its lineage record named an intact artifact
NOT_NEEDED = "not needed"  # … a stage whose output this config does not use (`StageSpec.needed`): no artifact


@dataclass
class StageResult:
    """A stage's artifact: where it is, its identity, its summary, what this run did for it, and how it is shown —
    one summary line (`describe`, also what the flow logs), its files (`outputs`), what this run did
    (`work_line`); the CLI prints every stage with these three (`cli.print_result`)."""

    url: str
    identity: str
    summary: dict[str, Any]
    work: str = "ran"  # ran | reused | rebuilt (token cache) | up to date (this run skipped the stage)
    seconds: float = 0.0

    @staticmethod
    def describe(summary: dict[str, Any]) -> str:
        raise NotImplementedError

    def line(self) -> str:
        return self.describe(self.summary)

    def outputs(self) -> list[tuple[str, str]]:
        """(what, where and how to read it) for each output a user looks at."""
        return [("output", self.url)]

    def work_line(self) -> str:
        return f"identity: {self.identity[:16]}   {self.work} ({self.seconds:.1f}s)"

    @property
    def reused(self) -> bool:
        """Whether the stage's flow found its artifact complete instead of computing it."""
        return self.work not in ("ran", "rebuilt")

    def up_to_date(self, cfg: Any) -> StageResult:
        """This result as rebuilt from its lineage record by a run that skipped the stage (`cfg`: that run's
        config, for what records never hold, e.g. storage options)."""
        return replace(self, work=UP_TO_DATE, seconds=0.0)


@dataclass
class ShardResult(StageResult):  # url: the shard directory; identity: the dataset's (what downstream keys on)
    shards_ran: list[str] = field(default_factory=list)  # tars written by this run
    shards_reused: list[str] = field(default_factory=list)  # found complete (their marker says so)
    manifest_work: str = "ran"  # ran | reused | up to date (this run skipped the stage)
    tar_identities: dict[str, str] = field(default_factory=dict)  # tar with samples → "identity:tar sha256"

    @property
    def manifest_url(self) -> str:
        return f"{self.url}/manifest.parquet"

    @staticmethod
    def describe(summary: dict) -> str:
        """One line: written / converted / skipped by reason."""
        st = summary["status"]
        parts = [f"{st.get('written', 0)} written", f"{st.get('converted', 0)} converted"]
        conv = {k.split(":", 1)[1]: v for k, v in summary["reasons"].items() if k.startswith("converted:")}
        if conv:
            parts[-1] += " (" + ", ".join(f"{k} {v}" for k, v in conv.items()) + ")"
        skipped = {k.split(":", 1)[1]: v for k, v in summary["reasons"].items() if k.startswith("skipped:")}
        parts.append(f"{st.get('skipped', 0)} skipped" + (" (" + ", ".join(f"{k} {v}" for k, v in skipped.items()) + ")" if skipped else ""))
        line = f"shard: {summary['images']} images → " + ", ".join(parts)
        if summary.get("empty_classes"):
            empty = summary["empty_classes"]
            line += f"; {len(empty)} class folder(s) without images (still classes): {', '.join(empty[:5])}"
        if summary.get("retry"):
            line += f"; {summary['retry']} unreadable file(s) retried by the next run"
        return line

    def outputs(self) -> list[tuple[str, str]]:
        return [("shards", f"{self.url}/" + "  ".join(self.summary["patterns"].values())),
                ("manifest", self.manifest_url),
                ("classes", f"{self.url}/classes.json   ({self.summary['classes']} classes)")]

    def work_line(self) -> str:
        return (f"identity: {self.identity[:16]}   this run wrote {len(self.shards_ran)} tars, reused "
                f"{len(self.shards_reused)} ({self.seconds:.1f}s)")

    def up_to_date(self, cfg: Any) -> ShardResult:
        return replace(self, work=UP_TO_DATE, shards_ran=[], shards_reused=[], manifest_work=UP_TO_DATE, seconds=0.0)



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

    def work_line(self) -> str:
        return (f"identity: {self.identity[:16]}   this run decomposed {len(self.tars_ran)} tars, reused "
                f"{len(self.tars_reused)} ({self.seconds:.1f}s)")

    def up_to_date(self, cfg: Any) -> DecomposeResult:
        return replace(self, work=UP_TO_DATE, tars_ran=[], tars_reused=[], index_work=UP_TO_DATE, seconds=0.0)



@dataclass
class TokenizerResult(StageResult):  # url: tokenizer.pt, metrics.json, curves.png, reconstructions.png, checkpoints/
    @property
    def checkpoint_url(self) -> str:
        return f"{self.url}/tokenizer.pt"

    @staticmethod
    def describe(summary: dict) -> str:
        if summary.get("adopted_from"):
            return (f"train_tokenizer: adopted {summary['adopted_from']} ({summary['layout']} layout), "
                    f"{summary['token_maps']} token maps, no training")
        return (f"train_tokenizer: {summary['steps']} steps, {summary['token_maps']} token maps, final rec "
                f"{summary['final_rec']:.4f}" + (f" ({summary['rec_psnr_db']} dB)" if summary.get("rec_psnr_db") else "")
                + f", code usage last map {summary['code_usage_per_map'][-1]:.2f}")

    def outputs(self) -> list[tuple[str, str]]:
        if self.summary.get("adopted_from"):
            return [("tokenizer", f"{self.checkpoint_url}   (the adopted weights; reconstructions: tokenize's preview)")]
        return [("tokenizer", self.checkpoint_url),
                ("pictures", f"{self.url}/reconstructions.png  {self.url}/curves.png")]



@dataclass
class TokensResult(StageResult):  # url: the cache directory <cache root>/tokens/<identity>
    options: dict | None = None  # fsspec options of the cache root
    local_cache: str | None = None

    def up_to_date(self, cfg: Any) -> TokensResult:
        """How to read the cache comes from this run's config: records never hold storage options."""
        return replace(self, work=UP_TO_DATE, seconds=0.0, options=cfg.artifact_options("tokenize"),
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



@dataclass
class ARResult(StageResult):  # url: transformer.pt, best.pt, metrics.csv, loss.png, summary.json, checkpoints/
    @property
    def checkpoint_url(self) -> str:
        return f"{self.url}/transformer.pt"

    @staticmethod
    def describe(summary: dict) -> str:
        if summary.get("adopted_from"):
            return (f"train_ar: adopted {summary['adopted_from']} ({summary['layout']} layout), "
                    f"{summary['parameters'] / 1e6:.2f} M parameters, {summary['token_maps']} token maps, no training")
        return (f"train_ar: {summary['steps']} steps, {summary['parameters'] / 1e6:.2f} M parameters, {summary['token_maps']} "
                f"token maps, loss {summary['final_loss']} (uniform {summary['uniform_loss']}), token accuracy "
                f"{summary['final_acc']}, best held-out loss {summary['best_val_loss']} at step {summary['best_step']}")

    def outputs(self) -> list[tuple[str, str]]:
        if self.summary.get("adopted_from"):
            return [("model", f"{self.checkpoint_url}   (the adopted weights, step 0; best.pt the same)")]
        return [("model", f"{self.checkpoint_url}   (and best.pt: lowest held-out loss)"),
                ("curves", f"{self.url}/loss.png   {self.url}/metrics.csv")]



@dataclass
class SampleResult(StageResult):  # url: grid.png, grids/, images/, samples.tar, hires/, summary.json
    @staticmethod
    def describe(summary: dict) -> str:
        hires = (f"; ×{summary['upscale']} patch-wise {summary['hires_images_per_s']} images/s"
                 if summary.get("hires_images_per_s") else "")
        ndp = (f"; NDP budget {summary['budget']:.0%} ({summary['estimator']}): {summary['gflops_per_image']} GFLOPs, "
               f"{summary['tokens_per_image']} tokens per image" if summary.get("model") == "ndp" else
               f"; detail dial {summary['detail_budget']:.0%} of patches: {summary['gflops_per_image']} GFLOPs per image"
               if summary.get("detail_budget") else "")
        return (f"sample: {summary['images']} images ({summary['classes']} classes × {summary['per_class']}), cfg "
                f"{summary['cfg']}, {summary['images_per_s']} images/s, {summary['forward_passes_per_image']} forward "
                f"passes per image{hires}{ndp}")

    def outputs(self) -> list[tuple[str, str]]:
        out = [("look at", f"{self.url}/grid.png   (per class: a real photo, then its samples)")]
        if self.summary.get("model") == "ndp":
            out.append(("", f"{self.url}/heatmap.png   (each sample beside how deep each patch was refined)"))
        elif self.summary.get("upscale", 1) > 1:
            out.append(("", f"{self.url}/hires/grid.png   (×{self.summary['upscale']}: bilinear vs CART's upscaled "
                            "base + patch-wise detail)"))
        return [*out, ("samples", f"{self.url}/samples.tar   (webdataset: png, cls)   {self.url}/images/")]



@dataclass
class EvalResult(StageResult):  # url: report.md, metrics.json, grid.png, grids/, curves.png, samples/
    reference: dict[str, Any] | None = None  # url, identity, work of the reference statistics

    @property
    def report_url(self) -> str:
        return f"{self.url}/report.md"

    @staticmethod
    def describe(summary: dict[str, Any]) -> str:
        nums = ", ".join(f"{k} {summary[k]:.4g}" for k in ("fid", "isc_mean", "kid_mean", "precision", "recall")
                         if summary.get(k) is not None)
        tok = f"; tokenizer rFID {summary['rfid']:.4g}, PSNR {summary['psnr']:.2f} dB" if summary.get("rfid") is not None else ""
        note = "" if summary["comparable"] else f" ({summary['extractor']}: not comparable with published numbers)"
        return (f"evaluate: {checkpoint_name(summary)}, {summary['samples']} samples: "
                f"{nums}{tok}{note}")

    def outputs(self) -> list[tuple[str, str]]:
        ref = self.reference or {}
        curves = f"  {self.url}/curves.png" if self.summary.get("checkpoints", 1) > 1 else ""
        return [("report", f"{self.report_url}   (what was evaluated, the numbers, the pictures)"),
                ("numbers", f"{self.url}/metrics.json   pictures: {self.url}/grid.png{curves}"),
                ("reference", f"{ref.get('url')}   ({ref.get('work')}; identity {str(ref.get('identity'))[:16]})")]



class PipelineResults(dict):
    """Each stage's result by name, plus what happened to it (``work``: up to date | ran) and the run's id;
    with several models, one per branch (`branches`, by model name)."""

    def __init__(self, run_id: str) -> None:
        super().__init__()
        self.run_id = run_id
        self.work: dict[str, str] = {}
        self.identities: dict[str, str] = {}  # stage identity (the lineage record's name)
        self.run_log: str | None = None
        self.shared: dict[str, str] = {}  # stage → the branch (model) whose identical artifact this one is
        self.branches: dict[str, PipelineResults] = {}  # every branch's results by model (this one included)
