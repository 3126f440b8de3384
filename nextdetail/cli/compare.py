"""`nextdetail compare`: every evaluation under a root side by side, and FID against GFLOPs per image."""

from __future__ import annotations

import argparse
from typing import Any

from nextdetail.cli.common import add_config_args, existing_root, load_one
from nextdetail.errors import UserError


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("compare", help="every evaluated model under the root side by side (+ FID vs GFLOPs PNG)",
                       description="One row per complete evaluation recorded under storage.root: FID, KID, IS, "
                                   "precision, recall, rFID, GFLOPs per image, training steps and time, tokens per "
                                   "image, identities, and the settings of every stage it was built from. Also "
                                   "draws FID against GFLOPs per image.")
    p.add_argument("--only-changed", action="store_true", help="only the settings that differ between rows")
    p.add_argument("--format", choices=["md", "csv", "json"], default="md", help="table format (default: md)")
    p.add_argument("--png", default=None, metavar="PATH",
                   help="where to draw FID vs GFLOPs (default: <storage.root>/reports/compare.png; - for none)")
    add_config_args(p)
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> None:
    from nextdetail.cache.compare import columns, comparison, render, write_scatter

    cfg = load_one(args)
    existing_root(cfg)
    rows = comparison(cfg)
    if not rows:
        raise UserError(f"storage.root={cfg.storage.root}: no complete evaluation recorded here yet; run "
                        "`nextdetail run` (or `nextdetail evaluate`) first")
    print(render(rows, columns(rows, args.only_changed), args.format))
    if args.png != "-":
        picture = write_scatter(cfg, rows, args.png)
        if args.format == "md":
            print(f"\nFID vs GFLOPs per image: {picture}")
