"""`nextdetail data embedded` (the dataset that ships) and `nextdetail config` (the resolved settings)."""

from __future__ import annotations

import argparse
from typing import Any

from nextdetail.cli.common import add_config_args, load_one


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("data", help="datasets that ship with nextdetail")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="DATASET")
    e = dsub.add_parser("embedded", help="build the embedded dataset (photos shipped in scikit-image)",
                        description="Write the embedded class-folder dataset under <storage.root>/sources/; "
                                    "size set by data.embedded.* (per_class, val_per_class, image_size, seed).")
    add_config_args(e)
    e.set_defaults(func=cmd_data_embedded)

    p = sub.add_parser("config", help="print the resolved configuration (preset + overrides) as YAML")
    add_config_args(p)
    p.set_defaults(func=cmd_config)


def cmd_data_embedded(args: argparse.Namespace) -> None:
    from nextdetail.storage.embedded import build_embedded
    from nextdetail.storage.fs import Store

    cfg = load_one(args)
    out = build_embedded(Store(cfg.storage.root, cfg.storage.options), cfg.data.embedded)
    print(f"embedded dataset: {out.url()}")


def cmd_config(args: argparse.Namespace) -> None:
    import yaml

    cfg = load_one(args)
    print(yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False), end="")
