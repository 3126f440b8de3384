"""`nextdetail run`, `status`, `lineage`, `serve`: the pipeline as a whole."""

from __future__ import annotations

import argparse
import os
from typing import Any

from nextdetail.cli import common
from nextdetail.cli.common import add_config_args, add_stage_selection, load_branches, load_one, print_result
from nextdetail.errors import UserError


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("run", help="run the pipeline (default preset: tiny on the embedded dataset)",
                       description="Run the pipeline's stages in order; finished stages are reused from storage.")
    add_config_args(p)
    add_stage_selection(p)
    p.add_argument("--dry-run", action="store_true", help="print what would run and why; start nothing")
    p.set_defaults(func=cmd_run, starts_processes=True)

    p = sub.add_parser("status", help="each stage: up to date, stale (and why) or missing",
                       description="For each stage: up to date, stale (which setting, upstream, input or code "
                                   "changed since it was built) or missing, with identities and locations. Reads "
                                   "lineage records and completion markers only.")
    add_config_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--explain", metavar="STAGE", default=None, type=common.stage_name,
                   help="print what STAGE's identity hashes: settings, upstream identities (and weights sha256), "
                        "inputs, every code file with its sha256")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("serve", help="serve the pipeline as a Prefect deployment (scheduled or triggered)",
                       description="Register the pipeline (this config as its parameters) as a Prefect deployment "
                                   "and execute its runs until interrupted: schedule it with --cron/--interval, or "
                                   "trigger runs from the Prefect UI/API. Uses PREFECT_API_URL when set.")
    add_config_args(p)
    p.add_argument("--name", default=None, help="deployment name (default: nextdetail-<preset>)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--cron", default=None, help="a cron schedule, e.g. '0 3 * * *'")
    g.add_argument("--interval", type=float, default=None, metavar="SECONDS", help="run every SECONDS")
    add_stage_selection(p)
    p.set_defaults(func=cmd_serve, starts_processes=True)

    p = sub.add_parser("lineage", help="where an artifact came from: settings, upstream, code, versions, runs",
                       description="Print the lineage record of ARTIFACT: a stage name (its artifact under the "
                                   "current config, else its latest), an identity prefix, or an artifact's URL.")
    p.add_argument("artifact", metavar="ARTIFACT")
    p.add_argument("--all", action="store_true", help="every matching record, newest first")
    add_config_args(p)
    p.set_defaults(func=cmd_lineage)


def preflight(branches: dict[str, Any]) -> None:
    """What makes a run fail, checked before Prefect or Dask start, each in one line: writable roots (the storage
    root, and every root a stage declares for its artifacts: the token cache), weights files that are there, a
    source that is a readable dataset folder with its splits and class folders."""
    from nextdetail.stages import REGISTRY
    from nextdetail.storage.fs import Store
    from nextdetail.storage.sources import check_root, split_prefixes

    for cfg in branches.values():
        Store(cfg.storage.root, cfg.storage.options).check_writable("storage.root")
        for stage in REGISTRY.values():
            url, options = stage.root(cfg)
            if url != cfg.storage.root:
                Store(url, options).check_writable(stage.storage_setting)
        for setting, url in (("tokenizer.pretrained", cfg.tokenizer.pretrained), ("ar.pretrained", cfg.ar.pretrained)):
            if url:
                folder, name = Store.of_file(url, cfg.storage.options if "://" in url else {})
                if not folder.exists(name):
                    raise UserError(f"{setting}={url}: no such file; copy the weights there (nothing is downloaded) "
                                    "or fix the path")
        if cfg.data.source != "embedded":
            source = Store(cfg.data.source, cfg.storage.options, follow_links=True)
            check_root(source, cfg.data.source)
            split_prefixes(source, cfg.data.source, cfg.data.splits, cfg.data.layout)


def cmd_run(args: argparse.Namespace) -> None:
    from nextdetail.stages import select_stages

    branches = load_branches(args)
    only, force = getattr(args, "only", None), getattr(args, "force", None) or []
    select_stages(args.until, only, force)
    if getattr(args, "dry_run", False):
        return _print_dry_run(branches, args.until, only, force)
    preflight(branches)
    from nextdetail.cache.current import current_results

    first = current_results(branches, select_stages(args.until, only, force), force)  # nothing to do: no Prefect
    if first is None:
        from nextdetail.pipeline.run import run_pipeline

        first = run_pipeline(branches, until=args.until, progress=not args.no_progress, only=only, force=force)
    cfg = next(iter(branches.values()))
    print(f"nextdetail run (preset {cfg.preset}) — outputs under {cfg.storage.root}")
    for model, results in first.branches.items():
        if len(branches) > 1:
            print(f"── model {model} " + "─" * 60)
        for stage in results.work:
            result = results.get(stage)
            if result is None:  # NOT_NEEDED
                print(f"{stage}: {results.work[stage]} by this config")
            elif stage in results.shared:
                print(f"{stage}: the same artifact as model {results.shared[stage]}'s   {result.url}")
            elif results.work.get(stage) == "up to date":
                print(f"{stage}: up to date   {result.url}   (identity {results.identities[stage][:12]})")
            else:
                print_result(result)
    if len(branches) > 1:
        _print_comparison(first.branches)
    print(f"  run log:   {first.run_log}   (run {first.run_id}; `nextdetail lineage STAGE` for one artifact)")


def _print_comparison(branches: dict[str, Any]) -> None:
    """The models of one run side by side: the headline numbers of their reports (evaluate's), if they have any."""
    reports = {model: next((r for r in results.values() if r.REPORT), None) for model, results in branches.items()}
    if any(r is None for r in reports.values()):
        return
    print("── models side by side (same data, same extractor) " + "─" * 25)
    keys = [("fid", "FID ↓"), ("kid_mean", "KID ↓"), ("isc_mean", "IS ↑"), ("precision", "precision ↑"),
            ("recall", "recall ↑"), ("gflops_per_image", "GFLOPs/image")]
    print(f"  {'model':<6}" + "".join(f"{label:>14}" for _, label in keys))
    for model, report in reports.items():
        cells = [report.summary.get(k) for k, _ in keys]
        print(f"  {model:<6}" + "".join(f"{c:>14.4g}" if isinstance(c, (int, float)) else f"{'-':>14}" for c in cells))


def _print_dry_run(branches: dict[str, Any], until: str | None, only: str | None, force: list[str]) -> None:
    """What `run` would do, from the status (nothing is started)."""
    from nextdetail.cache.status import NOT_NEEDED, UP_TO_DATE, branch_status
    from nextdetail.stages import select_stages

    stages = select_stages(until, only, force)
    cfg = next(iter(branches.values()))
    print(f"nextdetail run --dry-run (preset {cfg.preset}) — storage root {cfg.storage.root}")
    for model, statuses in branch_status(branches, tuple(stages)).items():
        if len(branches) > 1:
            print(f"  model {model}:")
        for stage in stages:
            st = statuses[stage]
            if st.shared_with:
                action = f"the same artifact as model {st.shared_with}'s"
            elif st.state == NOT_NEEDED:
                action = "skip (not needed by this config)"
            elif st.state == UP_TO_DATE and stage not in force:
                action = "skip (up to date)"
            elif only is not None and stage != only:
                action = f"blocked: upstream {stage} is {st.state} (drop --only)"
            elif stage in force:
                action = "rebuild (--force)"
            else:
                action = f"run ({st.state})"
            print(f"  {stage:<16} {action}")
            for reason in st.reasons if st.state not in (UP_TO_DATE, NOT_NEEDED) and not st.shared_with else ():
                print(f"  {'':<16}   {reason}")


def cmd_status(args: argparse.Namespace) -> None:
    import json

    from nextdetail.cache.status import branch_status, explain_stage, format_explain, format_status

    branches = load_branches(args)
    if args.explain:
        stage = common.known_stage(args.explain, "--explain")
        infos = [explain_stage(cfg, stage) for cfg in branches.values()]
        print(json.dumps(infos, indent=1) if args.json else "\n\n".join(format_explain(i) for i in infos))
        return
    statuses = branch_status(branches)
    if args.json:
        print(json.dumps([s.to_json() for by_stage in statuses.values() for s in by_stage.values()], indent=1))
    else:
        print(format_status(branches, statuses, verbose=args.verbose))


def cmd_lineage(args: argparse.Namespace) -> None:
    from nextdetail.cache.status import find_records, format_record

    cfg = load_one(args)
    for record in find_records(cfg, args.artifact)[: 1 if not args.all else None]:
        print(format_record(cfg, record))


def cmd_serve(args: argparse.Namespace) -> None:
    from nextdetail.conf import parse_models, parse_override
    from nextdetail.conf.secrets import override_has_secret
    from nextdetail.pipeline.run import scheduled_pipeline
    from nextdetail.pipeline.runtime import prefect_api

    load_branches(args)  # a bad config fails here, in one line, not in every scheduled run
    inline = [o.partition("=")[0] for o in args.override if override_has_secret(*parse_override(o))]
    if inline:  # a deployment's parameters are stored by the Prefect server and shown in its UI
        raise UserError(f"serve: -o {inline[0]}=… would store a credential in the deployment's parameters; give it "
                        "at run time instead: -o storage.credentials_block=NAME (a Prefect Secret block), "
                        "-o storage.credentials_file=PATH, or the environment / an AWS profile")
    preset = args.preset if args.preset or args.config else "tiny"
    parameters = {"preset": None if args.config else preset, "config_file": args.config, "overrides": args.override,
                  "until": args.until, "only": args.only, "force": args.force, "models": parse_models(args.model)}
    name = args.name or f"nextdetail-{preset if not args.config else 'custom'}"
    own_server = not os.environ.get("PREFECT_API_URL")
    with prefect_api() as url:
        common.INTERRUPTED = (f"serve stopped — the Prefect server it started ({url}) stopped with it" if own_server
                              else f"serve stopped — deployment nextdetail-scheduled/{name} stays registered on "
                                   f"{url}; its scheduled and triggered runs wait until it is served again") + \
            "; a run it was executing resumes from its finished stages when run again"
        print(f"nextdetail serve: deployment nextdetail-scheduled/{name} on {url}"
              + (f" (cron {args.cron!r})" if args.cron else f" (every {args.interval:g} s)" if args.interval else "")
              + "; trigger a run with `prefect deployment run nextdetail-scheduled/" + name + "`; Ctrl-C stops")
        scheduled_pipeline.serve(name=name, cron=args.cron, interval=args.interval, parameters=parameters,
                                 print_starting_message=False)
