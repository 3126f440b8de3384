"""`nextdetail plan`: bytes, objects, hours and memory per stage for the configured run and for ImageNet-1k."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from nextdetail.cli.common import add_config_args, load_one


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("plan", help="what a run will write and cost, per stage, here and for ImageNet-1k",
                       description="Per stage: images, bytes and objects written, CPU- or GPU-hours, peak memory per "
                                   "worker — for the configured source and for ImageNet-1k at the same settings. "
                                   "Per-image costs are measured on a sample of the source; the assumptions are "
                                   "printed. Runs no stage, writes nothing under the root.")
    p.add_argument("--images", type=int, default=None, metavar="N",
                   help="the train split's image count, for a source that cannot be listed (e.g. 1281167)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="workers (and GPUs) the time is split over (default: dask.n_workers)")
    p.add_argument("--json", action="store_true", help="both plans as JSON")
    add_config_args(p)
    p.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> None:
    from nextdetail.errors import UserError
    from nextdetail.plan import make_plans, render

    if args.images is not None and args.images < 1:
        raise UserError(f"--images {args.images}: give the train split's image count, e.g. --images 1281167")
    cfg = load_one(args)
    workers = args.workers or cfg.dask.n_workers or os.cpu_count() or 1
    plans = make_plans(cfg, args.images, workers)
    if args.json:
        print(json.dumps([p.to_dict() for p in plans], indent=1))
        return
    for plan in plans:
        print(render(plan))
        print()
    print("assumptions:")
    for line in plans[0].assumptions:
        print(f"  - {line}")
