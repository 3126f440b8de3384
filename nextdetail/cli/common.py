"""What every command shares: the config flags, stage selection, loading the config (one line on a bad one), and
printing a stage's result."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from nextdetail.errors import UserError

INTERRUPTED = "interrupted — re-run the same command to resume"
"""What Ctrl-C prints; `serve` replaces it with what stopping a server means."""


def add_config_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", default=None, help="shipped preset: tiny (default), imagenet256, imagenet512")
    g.add_argument("--config", default=None, metavar="FILE", help="a YAML file with the same sections as a preset")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting by dotted key, e.g. -o shard.resolution=64 -o storage.root=s3://b/p")
    p.add_argument("--model", default=None, metavar="cart|ndp|cart,ndp",
                   help="ndp: next-detail prediction with a compute dial — sets ar.model=ndp and its tokenizer "
                        "(tokenizer.order=0, tokenizer.truncation=0.5), then the preset's own settings for it (tiny: "
                        "tokenizer.steps=1000, tokenizer.decay=constant); -o overrides still win. Several (run, "
                        "status, serve, sample, eval): one branch per model in one run, shared stages built once")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="more output: Prefect's and Dask's INFO logs on the terminal (always in the Prefect UI); "
                        "status: the details of up-to-date stages too")


def add_stage_selection(p: argparse.ArgumentParser) -> None:
    from nextdetail.stages import STAGES

    names = f"one of {', '.join(STAGES)}; train-tokenizer and train_tokenizer both work"
    p.add_argument("--until", type=stage_name, default=None, metavar="STAGE", help=f"stop after this stage ({names})")
    p.add_argument("--only", type=stage_name, default=None, metavar="STAGE",
                   help="run this stage alone; the stages it depends on must be up to date")
    p.add_argument("--force", action="append", type=stage_name, default=[], metavar="STAGE",
                   help="rebuild STAGE from scratch even if it is up to date (repeatable)")


def positive(text: str) -> int:
    """An argparse type: a whole number ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number ≥ 1")
    return value


def stage_name(name: str) -> str:
    """A stage as the commands spell it (train-tokenizer) or as its package does (train_tokenizer); an
    unknown name passes through to `select_stages`, which names the stages in one line."""
    return name.replace("-", "_")


def known_stage(name: str, what: str) -> str:
    """`name` (either spelling) if it is a stage; one line naming the stages otherwise."""
    from nextdetail.stages import STAGES

    stage = stage_name(name)
    if stage not in STAGES:
        raise UserError(f"{what} {name}: no such stage (stages: {', '.join(STAGES)})")
    return stage


def load_branches(args: argparse.Namespace) -> dict[str, Any]:
    """One config per `--model` (the pipeline's branches); without --model, the config's own ar.model."""
    from nextdetail.conf import load_branches as load
    from nextdetail.conf import parse_models

    preset = args.preset if args.preset or args.config else "tiny"
    # A stage command checks the stages it runs and their upstream; a later stage's problem is a warning line.
    until = getattr(args, "only", None) or getattr(args, "until", None)
    branches = load(preset if not args.config else None, args.config, args.override,
                    parse_models(getattr(args, "model", None)), until=until)
    for line in dict.fromkeys(w for cfg in branches.values() for w in cfg.warnings()):
        print(f"nextdetail: warning: {line}", file=sys.stderr)
    return with_credentials(branches)


def with_credentials(branches: dict[str, Any]) -> dict[str, Any]:
    """Each branch with its credentials file / Secret block merged into storage.options (a block is read
    from the Prefect API: PREFECT_API_URL, else the ephemeral server started here and kept for the run)."""
    from nextdetail.conf.secrets import resolve_credentials

    if any(cfg.storage.credentials_block for cfg in branches.values()):
        from nextdetail.pipeline.runtime import prefect_api

        with prefect_api():
            return {m: resolve_credentials(cfg) for m, cfg in branches.items()}
    return {m: resolve_credentials(cfg) for m, cfg in branches.items()}


def load_one(args: argparse.Namespace) -> Any:
    """The config (a PipelineConfig) of a command that takes one model."""
    branches = load_branches(args)
    if len(branches) > 1:
        raise UserError(f"--model {args.model}: `nextdetail {args.command}` takes one model here; "
                        "several run as branches with run, status, serve, and sample/eval without --ckpt")
    return next(iter(branches.values()))


def existing_root(cfg: Any) -> None:
    """One line when `storage.root` is not there (commands that read a pipeline's root)."""
    from nextdetail.storage.fs import Store

    if not Store(cfg.storage.root, cfg.storage.options).exists(""):
        raise UserError(f"storage.root={cfg.storage.root}: no such directory or bucket prefix; point -o storage.root "
                        "at a pipeline's root")


def print_result(result: Any) -> None:
    """A stage's result: its summary line, the files to look at, what to do next, what this run did."""
    print(result.line())
    for what, where in result.outputs():
        print(f"  {what + ':' if what else '':<10} {where}")
    for hint in result.next_steps():
        print(f"  {hint}")
    print(f"  {result.work_line()}")
