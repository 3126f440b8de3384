"""`nextdetail show decomposition KEY…`: pictures of a stage's outputs (the decomposition is built first, or reused)."""

from __future__ import annotations

import argparse
from typing import Any

from nextdetail.cli.common import add_config_args, load_one


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("show", help="write pictures of stage outputs")
    ssub = p.add_subparsers(dest="show_command", required=True, metavar="WHAT")
    e = ssub.add_parser("decomposition", help="one PNG strip per image: I, B_1…B_n, D_1…D_n (CART Fig. 3)",
                        description="Write a PNG strip per KEY (the manifest's key column): the image, its base "
                                    "factors and its detail layers (contrast-stretched around grey).")
    e.add_argument("keys", nargs="+", metavar="KEY")
    e.add_argument("--out", default="nextdetail-figures", help="directory for the PNGs (default: %(default)s)")
    add_config_args(e)
    e.set_defaults(func=cmd_show_decomposition, starts_processes=True)


def cmd_show_decomposition(args: argparse.Namespace) -> None:
    from pathlib import Path

    from nextdetail.pipeline.run import run_pipeline
    from nextdetail.stages.decompose.pictures import write_strips

    cfg = load_one(args)
    if cfg.tokenizer_order == 0:  # the decomposition is what this command shows: build it at decompose.order
        cfg = cfg.model_copy(update={"tokenizer": cfg.tokenizer.model_copy(update={"order": None})})
    results = run_pipeline(cfg, until="decompose", progress=not args.no_progress)  # cached when done
    for path in write_strips(cfg, results["decompose"], results["shard"], args.keys, Path(args.out)):
        print(path)
