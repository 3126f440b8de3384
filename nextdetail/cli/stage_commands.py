"""One command per stage (`nextdetail shard`, … `train-ar`: the pipeline up to it, earlier stages reused), and
`sample` / `evaluate`, which also run on checkpoints from outside the pipeline (`--ckpt`). Their flags are
config overrides, written once in `SAMPLE_FLAGS` / `EVAL_FLAGS`: the parser and the overrides both come from there."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nextdetail.cli.common import add_config_args, load_one, print_result, stage_name
from nextdetail.cli.run import cmd_run


@dataclass(frozen=True)
class Flag:
    """A command-line flag that sets one config key."""

    flag: str
    key: str  # the dotted config key it overrides
    help: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # argparse's: type, nargs, choices

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    def add_to(self, p: argparse.ArgumentParser) -> None:
        p.add_argument(self.flag, default=None, help=self.help, **self.options)

    def override(self, args: argparse.Namespace) -> str | None:
        value = getattr(args, self.dest, None)
        if value is None:
            return None
        return f"{self.key}={'[' + ','.join(map(str, value)) + ']' if isinstance(value, list) else value}"


SAMPLE_FLAGS = (
    Flag("--classes", "sample.classes", "class indices (default: all)", {"type": int, "nargs": "+", "metavar": "C"}),
    Flag("--n", "sample.per_class", "samples per class", {"type": int}),
    Flag("--cfg", "sample.cfg", "classifier-free guidance at the last map", {"type": float}),
    Flag("--top-k", "sample.top_k", None, {"type": int}),
    Flag("--top-p", "sample.top_p", None, {"type": float}),
    Flag("--seed", "sample.seed", None, {"type": int}),
    Flag("--upscale", "sample.upscale", "also ×N by upscaled base + patch-wise detail; 1: off", {"type": int}),
    Flag("--budget", "sample.budget", "NDP: fraction of the full pyramid's refinements per image (0 < b ≤ 1)",
         {"type": float}),
    Flag("--estimator", "sample.estimator", "NDP: which patches to refine first",
         {"choices": ["learned", "entropy", "oracle", "random", "uniform"]}),
    Flag("--refine-per-step", "sample.refine_per_step", "NDP: patches refined per forward pass", {"type": int}),
    Flag("--detail-budget", "sample.detail_budget",
         "CART: fraction of latent patches that get detail tokens (the hardest; base-only elsewhere)", {"type": float}),
    Flag("--device", "sample.device", None, {"choices": ["cpu", "cuda"]}),
)

EVAL_FLAGS = (
    Flag("--reference", "eval.reference", "a split name (train, val) or a folder of images / an .npz batch"),
    Flag("--n", "eval.samples_per_class", "generated images per class", {"type": int}),
    Flag("--extractor", "eval.extractor", None, {"choices": ["inception-v3-compat", "nextdetail-randconv-v1"]}),
    Flag("--checkpoints", "eval.checkpoints", None, {"choices": ["last", "best", "all"]}),
    Flag("--seed", "eval.seed", None, {"type": int}),
    Flag("--device", "eval.device", None, {"choices": ["cpu", "cuda"]}),
)

WITH_OWN_COMMAND = ("sample", "evaluate")  # the stages whose commands are below, with flags and --ckpt


def add_parsers(sub: Any) -> None:
    from nextdetail.stages import REGISTRY

    for stage in REGISTRY.values():  # the pipeline up to and including the stage (earlier ones reused when done)
        if stage.name in WITH_OWN_COMMAND:
            continue
        p = sub.add_parser(stage.name.replace("_", "-"), help=stage.command_help,
                           description=stage.command_description)
        add_config_args(p)
        p.add_argument("--force", action="append", type=stage_name, default=[], metavar="STAGE",
                       help="rebuild STAGE (this one or an earlier one) from scratch (repeatable)")
        p.set_defaults(func=cmd_run, until=stage.name, starts_processes=True)

    p = sub.add_parser("sample", help="class-conditional samples with CFG: PNGs, grids, a webdataset tar",
                       description="Without --ckpt: run the pipeline up to its sample stage (outputs under "
                                   "<storage.root>/samples/). With --ckpt: sample that transformer.pt/best.pt into --out.")
    p.add_argument("--ckpt", default=None, metavar="PATH", help="a transformer.pt or best.pt of train-ar")
    p.add_argument("--out", default="nextdetail-samples", help="with --ckpt: output directory (default: %(default)s)")
    for f in SAMPLE_FLAGS:
        f.add_to(p)
    add_config_args(p)
    p.set_defaults(func=cmd_sample, starts_processes=True)

    p = sub.add_parser("evaluate", aliases=["eval"],
                       help="FID / IS / KID / precision-recall (torch-fidelity), rFID, a report",
                       description="Without --ckpt: run the pipeline up to its evaluate stage (outputs under "
                                   "<storage.root>/metrics/). With --ckpt: evaluate those transformer.pt/best.pt files into "
                                   "--out. Reference statistics are cached by content under <eval.reference_cache or "
                                   "storage.root>/refstats/.")
    p.add_argument("--ckpt", action="append", default=None, metavar="PATH",
                   help="a transformer.pt or best.pt of train-ar (repeat for several)")
    p.add_argument("--out", default="nextdetail-eval", help="with --ckpt: output directory (default: %(default)s)")
    for f in EVAL_FLAGS:
        f.add_to(p)
    add_config_args(p)
    p.set_defaults(func=cmd_eval, starts_processes=True)


def _with_flags(args: argparse.Namespace, flags: tuple[Flag, ...]) -> None:
    args.override = [*args.override, *(o for o in (f.override(args) for f in flags) if o is not None)]


def _absolute(path: str) -> str:
    return path if "://" in path else str(Path(path).resolve())


def cmd_sample(args: argparse.Namespace) -> None:
    _with_flags(args, SAMPLE_FLAGS)
    if args.ckpt is None:  # the pipeline up to its sample stage
        args.until = "sample"
        return cmd_run(args)
    from nextdetail.stages.sample.flow import sample_files

    cfg = load_one(args)
    print_result(sample_files(cfg, _absolute(args.ckpt), args.out, progress=not args.no_progress))


def cmd_eval(args: argparse.Namespace) -> None:
    _with_flags(args, EVAL_FLAGS)
    if not args.ckpt:  # the pipeline up to its evaluate stage
        args.until = "evaluate"
        return cmd_run(args)
    from nextdetail.pipeline.declaration import files_key
    from nextdetail.stages.evaluate.flow import evaluate_files

    cfg = load_one(args)
    shards = None
    reference = cfg.eval.reference
    if "/" not in reference and not reference.endswith(".npz"):  # a split of the configured dataset
        from nextdetail.pipeline.run import run_pipeline

        shards = run_pipeline(cfg, until="shard", progress=not args.no_progress)["shard"]
    ckpts = [_absolute(c) for c in args.ckpt]
    key = files_key(cfg, "evaluate", ckpts)
    print_result(evaluate_files(cfg, key, ckpts, _absolute(args.out), shards, progress=not args.no_progress))
