"""`nextdetail cache ls|du|gc|push|pull|verify|accept`: what a storage root holds, shared through a team bucket."""

from __future__ import annotations

import argparse
from typing import Any

from nextdetail.cli.common import add_config_args, existing_root, known_stage, load_branches, positive
from nextdetail.errors import UserError


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("cache", help="what the storage root holds: every artifact by stage, sizes, references",
                       description="ls: every artifact under storage.root (and tokens.cache) by stage — identity, "
                                   "size, built, last used (run log), which of the given configs reference it "
                                   "(default: the current one; --model cart,ndp for every branch), complete or "
                                   "not — and directories no lineage record names. du: totals per stage.")
    csub = p.add_subparsers(dest="cache_command", required=True, metavar="ls|du|gc|push|pull|verify|accept")
    for name, help_text in (("ls", "every artifact, one line each"), ("du", "totals per stage"),
                            ("gc", "remove what no given config references (dry run unless --yes)"),
                            ("push", "copy the complete artifacts the configs use (and their records) to a remote "
                                     "root: sha256-verified, create-only there, resumable"),
                            ("pull", "copy them from a remote root into this one (`--stage tokenize`: the token "
                                     "cache alone)"),
                            ("verify", "re-read every file of every complete artifact against its recorded sha256 "
                                       "(or size); --withdraw the damaged ones"),
                            ("accept", "record a stage whose code changed as up to date without recomputing (you "
                                       "vouch the change does not alter results; refused if settings or inputs "
                                       "changed), as `dvc commit`")):
        c = csub.add_parser(name, help=help_text)
        add_config_args(c)
        if name == "accept":
            c.add_argument("stage", metavar="STAGE", help="the stage (either spelling: train-ar, train_ar)")
        if name in ("push", "pull", "verify"):
            c.add_argument("--stage", action="append", default=None, metavar="STAGE",
                           help="only this stage (repeat for more)")
            c.add_argument("--jobs", type=positive, default=16, metavar="N",
                           help="files in flight at once (default: %(default)s)")
        if name in ("push", "pull"):
            c.add_argument("--to" if name == "push" else "--from", dest="to" if name == "push" else "source",
                           required=True, metavar="URL", help="the remote root (a path or s3://bucket/prefix)")
            c.add_argument("--remote-options", default=None, metavar="YAML",
                           help="fsspec options of the remote root (default: storage.options), e.g. "
                                "'{client_kwargs: {endpoint_url: http://host:9000}}'")
            c.add_argument("--all", action="store_true",
                           help="every complete recorded artifact, not only what the configs use")
        if name == "verify":
            c.add_argument("--withdraw", action="store_true",
                           help="move a damaged artifact's marker aside (the next run rebuilds it)")
        if name in ("ls", "du", "gc"):
            c.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "gc":
            c.add_argument("--keep-last", type=int, default=0, metavar="N",
                           help="also keep the newest N complete artifacts of every stage")
            c.add_argument("--keep-newer", default=None, metavar="DURATION",
                           help="also keep what was built within DURATION (30m, 12h, 7d)")
            c.add_argument("--yes", action="store_true", help="delete (without it: print what would go)")
        c.set_defaults(func=cmd_cache)


def cmd_cache(args: argparse.Namespace) -> None:
    import json

    from nextdetail.cache.inventory import format_du, format_ls, inventory

    if args.cache_command == "gc" and not args.model:
        args.model = "cart,ndp"  # gc keeps what every model branch references unless --model narrows it
    branches = load_branches(args)
    cfg = next(iter(branches.values()))
    if args.cache_command == "pull":  # into a root that may not exist yet
        return _cache_transfer(args, branches)
    existing_root(cfg)
    if args.cache_command == "gc":
        return _cache_gc(args, branches)
    if args.cache_command == "push":
        return _cache_transfer(args, branches)
    if args.cache_command == "verify":
        return _cache_verify(args, cfg)
    if args.cache_command == "accept":
        from nextdetail.cache.accept import accept

        stage = known_stage(args.stage, "cache accept")
        for model, branch in branches.items():
            record = accept(branch, stage)
            changed = record["accepted"]["code_changed"]
            listed = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
            print(f"accepted {stage} ({model}): {record['identity'][:12]} is now an alias of "
                  f"{record['accepted']['from'][:12]} (code changed: {listed or 'none'})")
        return
    entries = inventory(branches)
    if args.json:
        print(json.dumps([e.to_json() for e in entries], indent=1))
        return
    print(f"nextdetail cache {args.cache_command} — storage root {cfg.storage.root}")
    print(format_ls(entries) if args.cache_command == "ls" else format_du(entries))


def _cache_gc(args: argparse.Namespace, branches: dict) -> None:
    import json

    from nextdetail.cache.inventory import apply_gc, format_gc, inventory, plan_gc

    if args.keep_last < 0:
        raise UserError(f"--keep-last {args.keep_last}: give a count ≥ 0")
    keep_newer = _duration(args.keep_newer) if args.keep_newer else None
    cfg = next(iter(branches.values()))
    removals, kept = plan_gc(cfg, inventory(branches), args.keep_last, keep_newer)
    if args.json:
        print(json.dumps({"remove": [{**r.entry.to_json(), "reason": r.reason} for r in removals],
                          "kept": len(kept), "deleted": bool(args.yes)}, indent=1))
    else:
        print(f"nextdetail cache gc — storage root {cfg.storage.root}" + ("" if args.yes else " (dry run)"))
        print(format_gc(removals, kept, dry_run=not args.yes))
    if args.yes:
        apply_gc(cfg, removals, log=(lambda _: None) if args.json else print)


def _cache_transfer(args: argparse.Namespace, branches: dict) -> None:
    """push: this root's complete artifacts (what the configs reference) → --to; pull: --from's → this root."""
    import yaml

    from nextdetail.cache.inventory import human
    from nextdetail.cache.transfer import at_root, plan_transfer, transfer
    from nextdetail.storage.fs import Store

    remote = args.to if args.cache_command == "push" else args.source
    try:
        options = yaml.safe_load(args.remote_options) if args.remote_options else None
    except yaml.YAMLError as err:
        raise UserError(f"--remote-options: not YAML ({str(err).splitlines()[0]}); e.g. "
                        "'{client_kwargs: {endpoint_url: http://host:9000}}'") from None
    if options is not None and not isinstance(options, dict):
        raise UserError("--remote-options: give a mapping, e.g. '{client_kwargs: {endpoint_url: http://host:9000}}'")
    cfg = next(iter(branches.values()))
    options = cfg.storage.options if options is None else options
    args.stage = [known_stage(s, "--stage") for s in args.stage or ()] or None
    there = {m: at_root(c, remote, options) for m, c in branches.items()}
    src, dst = (branches, there) if args.cache_command == "push" else (there, branches)
    src_cfg, dst_cfg = next(iter(src.values())), next(iter(dst.values()))
    if args.cache_command == "pull" and not Store(remote, options).exists(""):
        raise UserError(f"--from {remote}: no such directory or bucket prefix (or not readable with these "
                        "credentials); give the root a teammate pushed to")
    Store(dst_cfg.storage.root, dst_cfg.storage.options).check_writable(
        "--to" if args.cache_command == "push" else "storage.root")
    plan = plan_transfer(src, args.stage, everything=args.all)
    print(f"nextdetail cache {args.cache_command} — {src_cfg.storage.root} → {dst_cfg.storage.root}: "
          f"{len(plan.records)} artifact(s)")
    for line in plan.absent:
        print(f"  not at the source (left out): {line}")
    sent = transfer(plan, src_cfg, dst_cfg, progress=not args.no_progress, jobs=args.jobs)
    copied = [s for s in sent if s.state == "copied"]
    print(f"  {len(copied)} copied ({human(sum(s.bytes for s in sent))} sent), "
          f"{sum(s.state == 'already there' for s in sent)} already there, "
          f"{sum(s.state == 'record only' for s in sent)} record only")


def _cache_verify(args: argparse.Namespace, cfg: Any) -> None:
    from nextdetail.cache.transfer import verify, withdraw_damaged

    results = verify(cfg, args.stage, progress=not args.no_progress, jobs=args.jobs)
    damaged = [d for d in results if d.bad]
    if args.withdraw:
        withdraw_damaged(cfg, damaged)
    print(f"nextdetail cache verify — storage root {cfg.storage.root}: {len(results)} artifact(s), "
          f"{sum(d.checked for d in results)} files ({sum(d.unhashed for d in results)} by size only: no sha256 "
          "recorded)")
    for d in damaged:
        print(f"  DAMAGED {d.stage} {d.identity[:12]} {d.url}" + ("  (withdrawn: the next run rebuilds it)"
                                                                 if d.withdrawn else ""))
        for why in d.bad[:10]:
            print(f"    {why}")
    if damaged:
        if not args.withdraw:
            print("  --withdraw moves their markers aside so the next run rebuilds them")
        raise SystemExit(1)
    print("  every artifact intact")


def _duration(text: str) -> float:
    """`30m`, `12h`, `7d`, `90s` → seconds; one line otherwise."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    try:
        return float(text[:-1]) * units[text[-1]]
    except (KeyError, ValueError, IndexError):
        raise UserError(f"--keep-newer {text!r}: give a number and a unit, e.g. 30m, 12h, 7d") from None
