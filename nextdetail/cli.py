"""The `nextdetail` command line. Every output lives under `storage.root`.

Errors the user can fix (bad config, bad paths) print one line and exit 2; tracebacks are for bugs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from nextdetail.errors import UserError
from nextdetail.flows.runtime import configure_environment


def _add_config_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", default=None, help="shipped preset: tiny (default), imagenet256, imagenet512")
    g.add_argument("--config", default=None, metavar="FILE", help="a YAML file with the same sections as a preset")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting by dotted key, e.g. -o shard.resolution=64 -o storage.root=s3://b/p")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")


def _load(args: argparse.Namespace):
    from nextdetail.conf import load_config

    preset = args.preset if args.preset or args.config else "tiny"
    return load_config(preset=preset if not args.config else None, config_file=args.config, overrides=args.override)


def _print_shard(result) -> None:
    from nextdetail.tasks.shard import summary_line

    s = result.summary
    print(summary_line(s))
    print(f"  shards:   {result.url}/" + "  ".join(s["patterns"].values()))
    print(f"  manifest: {result.manifest_url}")
    print(f"  classes:  {result.url}/classes.json   ({s['classes']} classes)")
    print(f"  identity: {result.identity[:16]}   this run wrote {len(result.shards_ran)} tars, "
          f"reused {len(result.shards_cached) + len(result.shards_reused)} ({result.seconds:.1f}s)")


def cmd_run(args: argparse.Namespace) -> None:
    from nextdetail.flows.pipeline import run_pipeline

    cfg = _load(args)
    results = run_pipeline(cfg, until=args.until, progress=not args.no_progress)
    print(f"nextdetail run (preset {cfg.preset}) — outputs under {cfg.storage.root}")
    if "shard" in results:
        _print_shard(results["shard"])


def cmd_shard(args: argparse.Namespace) -> None:
    args.until = "shard"
    cmd_run(args)


def cmd_data_embedded(args: argparse.Namespace) -> None:
    from nextdetail.storage.embedded import build_embedded
    from nextdetail.storage.fs import Store

    cfg = _load(args)
    out = build_embedded(Store(cfg.storage.root, cfg.storage.options), cfg.data.embedded)
    print(f"embedded dataset: {out.url()}")


def cmd_config(args: argparse.Namespace) -> None:
    import yaml

    cfg = _load(args)
    print(yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False), end="")


def build_parser() -> argparse.ArgumentParser:
    from nextdetail.conf import STAGES

    parser = argparse.ArgumentParser(prog="nextdetail", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the pipeline (default preset: tiny on the embedded dataset)",
                       description="Run the pipeline's stages in order; finished stages are reused from storage.")
    _add_config_args(p)
    p.add_argument("--until", choices=STAGES, default=None, help="stop after this stage")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("shard", help="class folders / ImageNet / embedded → webdataset tars + Parquet manifest",
                       description="Run the shard stage alone: tars, manifest.parquet and classes.json under "
                                   "<storage.root>/shards/. Source: -o data.source=PATH|URL|embedded.")
    _add_config_args(p)
    p.set_defaults(func=cmd_shard)

    p = sub.add_parser("data", help="datasets that ship with nextdetail")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="DATASET")
    e = dsub.add_parser("embedded", help="build the embedded dataset (photos shipped in scikit-image)",
                        description="Write the embedded class-folder dataset under <storage.root>/sources/; "
                                    "size set by data.embedded.* (per_class, val_per_class, image_size, seed).")
    _add_config_args(e)
    e.set_defaults(func=cmd_data_embedded)

    p = sub.add_parser("config", help="print the resolved configuration (preset + overrides) as YAML")
    _add_config_args(p)
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    configure_environment()
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as err:
        print(f"nextdetail: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nextdetail: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
