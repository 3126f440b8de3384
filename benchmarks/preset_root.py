"""What the benchmarks that read `make run`'s models share: the `--preset / --root / -o` arguments and the
preset's pipeline, built or reused under the root up to a stage (`make run`'s root by default)."""

from __future__ import annotations

import argparse
from typing import Any


def arguments(description: str) -> argparse.ArgumentParser:
    """A parser with `--preset` (tiny), `--root` (make run's) and `-o key=value …`; the benchmark adds its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--root", default="./nextdetail-data", help="storage root (default: make run's)")
    parser.add_argument("-o", dest="overrides", action="append", default=[])
    return parser


def built(args: argparse.Namespace, until: str) -> tuple[Any, dict[str, Any]]:
    """(the config, the stage results up to `until`): the preset's pipeline under `args.root`, reused where it is up
    to date. Prefect's chatter stays off the terminal (the environment is set before Prefect is imported)."""
    from nextdetail.pipeline.runtime import configure_environment

    configure_environment()
    from nextdetail.conf import load_config
    from nextdetail.pipeline.run import run_pipeline
    from nextdetail.pipeline.runtime import prefect_api

    cfg = load_config(args.preset, overrides=[f"storage.root={args.root}", *args.overrides])
    with prefect_api():
        return cfg, run_pipeline(cfg, until=until, progress=False)
