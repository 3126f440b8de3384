"""The `nextdetail` command line. Every output lives under `storage.root`.

Errors the user can fix (bad config, bad paths) print one line and exit 2; tracebacks are for bugs.
"""

from __future__ import annotations

import argparse
import os
import signal
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
    p.add_argument("--model", default=None, metavar="cart|ndp|cart,ndp",
                   help="ndp: next-detail prediction with a compute dial — sets ar.model=ndp and its tokenizer "
                        "(tokenizer.order=0, tokenizer.truncation=0.5; -o overrides still win). Several (run, "
                        "status, serve, sample, eval): one branch per model in one run, shared stages built once")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="more output: Prefect's and Dask's INFO logs on the terminal (always in the Prefect UI); "
                        "status: the details of up-to-date stages too")


def _add_stage_selection(p: argparse.ArgumentParser) -> None:
    from nextdetail.conf import STAGES

    names = f"one of {', '.join(STAGES)}; train-tokenizer and train_tokenizer both work"
    p.add_argument("--until", type=stage_name, default=None, metavar="STAGE", help=f"stop after this stage ({names})")
    p.add_argument("--only", type=stage_name, default=None, metavar="STAGE",
                   help="run this stage alone; the stages it depends on must be up to date")
    p.add_argument("--force", action="append", type=stage_name, default=[], metavar="STAGE",
                   help="rebuild STAGE from scratch even if it is up to date (repeatable)")


def _positive(text: str) -> int:
    """An argparse type: a whole number ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number ≥ 1")
    return value


def stage_name(name: str) -> str:
    """A stage as the commands spell it (train-tokenizer) or as the stage table does (train_tokenizer); an
    unknown name passes through to `select_stages`, which names the stages in one line."""
    return name.replace("-", "_")


def _load_branches(args: argparse.Namespace) -> dict:
    """One config per `--model` (the pipeline's branches); without --model, the config's own ar.model."""
    from nextdetail.conf import load_branches, parse_models

    preset = args.preset if args.preset or args.config else "tiny"
    # A stage command checks the stages it runs and their upstream; a later stage's problem is a warning line.
    until = getattr(args, "only", None) or getattr(args, "until", None)
    branches = load_branches(preset if not args.config else None, args.config, args.override,
                             parse_models(getattr(args, "model", None)), until=until)
    for line in dict.fromkeys(w for cfg in branches.values() for w in cfg.warnings()):
        print(f"nextdetail: warning: {line}", file=sys.stderr)
    return _with_credentials(branches)


def _with_credentials(branches: dict) -> dict:
    """Each branch with its credentials file / Secret block merged into storage.options (a block is read
    from the Prefect API: PREFECT_API_URL, else the ephemeral server started here and kept for the run)."""
    from nextdetail.conf.secrets import resolve_credentials

    if any(cfg.storage.credentials_block for cfg in branches.values()):
        from nextdetail.flows.runtime import prefect_api

        with prefect_api():
            return {m: resolve_credentials(cfg) for m, cfg in branches.items()}
    return {m: resolve_credentials(cfg) for m, cfg in branches.items()}


def _load(args: argparse.Namespace):
    """The config of a command that takes one model."""
    branches = _load_branches(args)
    if len(branches) > 1:
        raise UserError(f"--model {args.model}: `nextdetail {args.command}` takes one model here; "
                        "several run as branches with run, status, serve, and sample/eval without --ckpt")
    return next(iter(branches.values()))


def print_result(result) -> None:
    """A stage's result: its summary line, the files to look at, what this run did (stages/results.py)."""
    print(result.line())
    for what, where in result.outputs():
        print(f"  {what + ':' if what else '':<10} {where}")
    print(f"  {result.work_line()}")


def _sample_overrides(args: argparse.Namespace) -> list[str]:
    """`nextdetail sample`'s flags as sample.* overrides."""
    out = []
    for flag, key in (("classes", "classes"), ("n", "per_class"), ("cfg", "cfg"), ("top_k", "top_k"),
                      ("top_p", "top_p"), ("seed", "seed"), ("upscale", "upscale"), ("device", "device"),
                      ("budget", "budget"), ("estimator", "estimator"), ("refine_per_step", "refine_per_step"),
                      ("detail_budget", "detail_budget")):
        value = getattr(args, flag, None)
        if value is not None:
            out.append(f"sample.{key}={'[' + ','.join(map(str, value)) + ']' if isinstance(value, list) else value}")
    return out


def cmd_sample(args: argparse.Namespace) -> None:
    args.override = [*args.override, *_sample_overrides(args)]
    if args.ckpt is None:  # the pipeline up to its sample stage
        args.until = "sample"
        return cmd_run(args)
    from pathlib import Path

    from nextdetail.stages.results import SampleResult
    from nextdetail.storage.fs import Store
    from nextdetail.tasks.sample import SampleInputs, run_sampling

    cfg = _load(args)
    ckpt = args.ckpt if "://" in args.ckpt else str(Path(args.ckpt).resolve())
    inputs = SampleInputs(ckpt, cfg.storage.options, roots=(cfg.storage.root,))  # + the checkpoint's own root
    summary, _ = run_sampling(Store(args.out, cfg.storage.options), inputs, cfg.sample, progress=not args.no_progress)
    print_result(SampleResult(summary["url"], "", summary, work="ran (outside the pipeline's cache)"))


def cmd_eval(args: argparse.Namespace) -> None:
    for flag, key in (("reference", "reference"), ("n", "samples_per_class"), ("extractor", "extractor"),
                      ("checkpoints", "checkpoints"), ("seed", "seed"), ("device", "device")):
        if getattr(args, flag) is not None:
            args.override = [*args.override, f"eval.{key}={getattr(args, flag)}"]
    if not args.ckpt:  # the pipeline up to its evaluate stage
        args.until = "evaluate"
        return cmd_run(args)
    from pathlib import Path

    from nextdetail.flows.evaluate import evaluate_files

    cfg = _load(args)
    shards = None
    reference = cfg.eval.reference
    if "/" not in reference and not reference.endswith(".npz"):  # a split of the configured dataset
        from nextdetail.flows.pipeline import run_pipeline

        shards = run_pipeline(cfg, until="shard", progress=not args.no_progress)["shard"]
    ckpts = [c if "://" in c else str(Path(c).resolve()) for c in args.ckpt]
    out = args.out if "://" in args.out else str(Path(args.out).resolve())
    from nextdetail.conf.stages import files_key

    key = files_key(cfg, "evaluate", ckpts)
    print_result(evaluate_files(cfg, key, ckpts, out, shards, progress=not args.no_progress))


def preflight(branches: dict) -> None:
    """What makes a run fail, checked before Prefect or Dask start, each in one line: a writable storage root
    (and token cache), a source that is a readable dataset folder with its splits and class folders."""
    from nextdetail.storage.fs import Store
    from nextdetail.storage.sources import check_root, split_prefixes

    for cfg in branches.values():
        Store(cfg.storage.root, cfg.storage.options).check_writable("storage.root")
        if cfg.tokens.cache:
            options = cfg.tokens.cache_options if cfg.tokens.cache_options is not None else cfg.storage.options
            Store(cfg.tokens.cache, options).check_writable("tokens.cache")
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
    from nextdetail.conf.stages import select_stages

    branches = _load_branches(args)
    only, force = getattr(args, "only", None), getattr(args, "force", None) or []
    select_stages(args.until, only, force)
    if getattr(args, "dry_run", False):
        return _print_dry_run(branches, args.until, only, force)
    preflight(branches)
    from nextdetail.stages.current import current_results

    first = current_results(branches, select_stages(args.until, only, force), force)  # nothing to do: no Prefect
    if first is None:
        from nextdetail.flows.pipeline import run_pipeline

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
                if stage == "decompose" and result.summary.get("first_key"):
                    print(f"  look at one: nextdetail show decomposition {result.summary['first_key']}")
    if len(branches) > 1 and all("evaluate" in r for r in first.branches.values()):
        _print_comparison(first.branches)
    print(f"  run log:   {first.run_log}   (run {first.run_id}; `nextdetail lineage STAGE` for one artifact)")


def _print_comparison(branches: dict) -> None:
    """The models of one run side by side: their evaluations' headline numbers."""
    print("── models side by side (same data, same extractor) " + "─" * 25)
    keys = [("fid", "FID ↓"), ("kid_mean", "KID ↓"), ("isc_mean", "IS ↑"), ("precision", "precision ↑"),
            ("recall", "recall ↑"), ("gflops_per_image", "GFLOPs/image")]
    print(f"  {'model':<6}" + "".join(f"{label:>14}" for _, label in keys))
    for model, results in branches.items():
        s = results["evaluate"].summary
        cells = [s.get(k) for k, _ in keys]
        print(f"  {model:<6}" + "".join(f"{c:>14.4g}" if isinstance(c, (int, float)) else f"{'-':>14}" for c in cells))


def _print_dry_run(branches: dict, until: str | None, only: str | None, force: list[str]) -> None:
    """What `run` would do, from the status (nothing is started)."""
    from nextdetail.conf.stages import select_stages
    from nextdetail.stages.status import NOT_NEEDED, UP_TO_DATE, branch_status

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

    from nextdetail.conf import STAGES
    from nextdetail.stages.status import branch_status, explain_stage, format_explain, format_status

    branches = _load_branches(args)
    if args.explain:
        if args.explain not in STAGES:
            raise UserError(f"--explain {args.explain!r}: no such stage (stages: {', '.join(STAGES)})")
        infos = [explain_stage(cfg, args.explain) for cfg in branches.values()]
        print(json.dumps(infos, indent=1) if args.json else "\n\n".join(format_explain(i) for i in infos))
        return
    statuses = branch_status(branches)
    if args.json:
        print(json.dumps([s.to_json() for by_stage in statuses.values() for s in by_stage.values()], indent=1))
    else:
        print(format_status(branches, statuses, verbose=args.verbose))


def cmd_cache(args: argparse.Namespace) -> None:
    import json

    from nextdetail.stages.inventory import format_du, format_ls, inventory
    from nextdetail.storage.fs import Store

    if args.cache_command == "gc" and not args.model:
        args.model = "cart,ndp"  # gc keeps what every model branch references unless --model narrows it
    branches = _load_branches(args)
    cfg = next(iter(branches.values()))
    if args.cache_command == "pull":  # into a root that may not exist yet
        return _cache_transfer(args, branches)
    if not Store(cfg.storage.root, cfg.storage.options).exists(""):
        raise UserError(f"storage.root={cfg.storage.root}: no such directory or bucket prefix; point -o storage.root "
                        "at a pipeline's root")
    if args.cache_command == "gc":
        return _cache_gc(args, branches)
    if args.cache_command == "push":
        return _cache_transfer(args, branches)
    if args.cache_command == "verify":
        return _cache_verify(args, cfg)
    if args.cache_command == "accept":
        from nextdetail.conf.schema import STAGES
        from nextdetail.stages.accept import accept

        stage = stage_name(args.stage)
        if stage not in STAGES:
            raise UserError(f"cache accept {args.stage}: no such stage; one of {', '.join(STAGES)}")
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

    from nextdetail.stages.inventory import apply_gc, format_gc, inventory, plan_gc

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

    from nextdetail.conf import STAGES
    from nextdetail.stages.inventory import human
    from nextdetail.stages.transfer import at_root, plan_transfer, transfer
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
    unknown = [s for s in args.stage or () if s not in STAGES]
    if unknown:
        raise UserError(f"--stage {unknown[0]}: no such stage (stages: {', '.join(STAGES)})")
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


def _cache_verify(args: argparse.Namespace, cfg) -> None:  # cfg: a PipelineConfig
    from nextdetail.stages.transfer import verify, withdraw_damaged

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


def cmd_compare(args: argparse.Namespace) -> None:
    from nextdetail.stages.compare import columns, comparison, render, scatter_png
    from nextdetail.storage.fs import Store

    cfg = _load(args)
    root = Store(cfg.storage.root, cfg.storage.options)
    if not root.exists(""):
        raise UserError(f"storage.root={cfg.storage.root}: no such directory or bucket prefix; point -o storage.root "
                        "at a pipeline's root")
    rows = comparison(cfg)
    if not rows:
        raise UserError(f"storage.root={cfg.storage.root}: no complete evaluation recorded here yet; run "
                        "`nextdetail run` (or `nextdetail evaluate`) first")
    print(render(rows, columns(rows, args.only_changed), args.format))
    if args.png != "-":
        picture = args.png or root.url("reports", "compare.png")
        folder, name = Store.of_file(picture, cfg.storage.options if not args.png else None)
        folder.write_bytes(name, scatter_png(rows))
        if args.format == "md":
            print(f"\nFID vs GFLOPs per image: {picture}")


def cmd_lineage(args: argparse.Namespace) -> None:
    from nextdetail.stages.status import find_records, format_record

    cfg = _load(args)
    for record in find_records(cfg, args.artifact)[: 1 if not args.all else None]:
        print(format_record(cfg, record))


def cmd_serve(args: argparse.Namespace) -> None:
    from nextdetail.conf import parse_models
    from nextdetail.flows.pipeline import scheduled_pipeline
    from nextdetail.flows.runtime import prefect_api

    _load_branches(args)  # a bad config fails here, in one line, not in every scheduled run
    from nextdetail.conf import parse_override
    from nextdetail.conf.secrets import override_has_secret

    inline = [o.partition("=")[0] for o in args.override if override_has_secret(*parse_override(o))]
    if inline:  # a deployment's parameters are stored by the Prefect server and shown in its UI
        raise UserError(f"serve: -o {inline[0]}=… would store a credential in the deployment's parameters; give it "
                        "at run time instead: -o storage.credentials_block=NAME (a Prefect Secret block), "
                        "-o storage.credentials_file=PATH, or the environment / an AWS profile")
    preset = args.preset if args.preset or args.config else "tiny"
    parameters = {"preset": None if args.config else preset, "config_file": args.config, "overrides": args.override,
                  "until": args.until, "only": args.only, "force": args.force, "models": parse_models(args.model)}
    name = args.name or f"nextdetail-{preset if not args.config else 'custom'}"
    global INTERRUPTED
    own_server = not os.environ.get("PREFECT_API_URL")
    with prefect_api() as url:
        INTERRUPTED = (f"serve stopped — the Prefect server it started ({url}) stopped with it" if own_server else
                       f"serve stopped — deployment nextdetail-scheduled/{name} stays registered on {url}; its "
                       "scheduled and triggered runs wait until it is served again") + \
            "; a run it was executing resumes from its finished stages when run again"
        print(f"nextdetail serve: deployment nextdetail-scheduled/{name} on {url}"
              + (f" (cron {args.cron!r})" if args.cron else f" (every {args.interval:g} s)" if args.interval else "")
              + "; trigger a run with `prefect deployment run nextdetail-scheduled/" + name + "`; Ctrl-C stops")
        scheduled_pipeline.serve(name=name, cron=args.cron, interval=args.interval, parameters=parameters,
                                 print_starting_message=False)


def cmd_show_decomposition(args: argparse.Namespace) -> None:
    from pathlib import Path

    from nextdetail.figures import decomposition_strip, safe_name, write_png
    from nextdetail.flows.pipeline import run_pipeline
    from nextdetail.storage.factors import open_array, open_group, read_index
    from nextdetail.storage.fs import Store
    from nextdetail.storage.shards import read_tar_images

    cfg = _load(args)
    if cfg.tokenizer_order == 0:  # the decomposition is what this command shows: build it at decompose.order
        cfg = cfg.model_copy(update={"tokenizer": cfg.tokenizer.model_copy(update={"order": None})})
    results = run_pipeline(cfg, until="decompose", progress=not args.no_progress)  # cached when done
    dec, shards = results["decompose"], results["shard"]
    store = Store(dec.url, cfg.storage.options)
    index = {r["key"]: r for r in read_index(store).to_pylist()}
    missing = [k for k in args.keys if k not in index]
    if missing:
        example = next(iter(index), "?")
        raise UserError(f"key {missing[0]!r} is not in {dec.url}/index.parquet (e.g. {example!r}); "
                        "keys are the manifest's `key` column")
    group = open_group(store)
    out_dir = Path(args.out)
    for key in args.keys:
        row = index[key]
        bases = open_array(store, group, row["split"], row["shard"])[row["row"]].astype("float32")  # (n, 3, H, W)
        image = read_tar_images(Store(shards.url, cfg.storage.options), row["shard"], (key,),
                                cfg.shard.image_format)[0].transpose(2, 0, 1).astype("float32") / 255
        path = out_dir / f"decomposition-{safe_name(key)}.png"
        write_png(path, decomposition_strip(image, bases))
        print(path)


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

    parser = argparse.ArgumentParser(prog="nextdetail", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the pipeline (default preset: tiny on the embedded dataset)",
                       description="Run the pipeline's stages in order; finished stages are reused from storage.")
    _add_config_args(p)
    _add_stage_selection(p)
    p.add_argument("--dry-run", action="store_true", help="print what would run and why; start nothing")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="each stage: up to date, stale (and why) or missing",
                       description="For each stage: up to date, stale (which setting, upstream, input or code "
                                   "changed since it was built) or missing, with identities and locations. Reads "
                                   "lineage records and completion markers only.")
    _add_config_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--explain", metavar="STAGE", default=None, type=stage_name,
                   help="print what STAGE's identity hashes: settings, upstream identities (and weights sha256), "
                        "inputs, every code file with its sha256")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("serve", help="serve the pipeline as a Prefect deployment (scheduled or triggered)",
                       description="Register the pipeline (this config as its parameters) as a Prefect deployment "
                                   "and execute its runs until interrupted: schedule it with --cron/--interval, or "
                                   "trigger runs from the Prefect UI/API. Uses PREFECT_API_URL when set.")
    _add_config_args(p)
    p.add_argument("--name", default=None, help="deployment name (default: nextdetail-<preset>)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--cron", default=None, help="a cron schedule, e.g. '0 3 * * *'")
    g.add_argument("--interval", type=float, default=None, metavar="SECONDS", help="run every SECONDS")
    _add_stage_selection(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("lineage", help="where an artifact came from: settings, upstream, code, versions, runs",
                       description="Print the lineage record of ARTIFACT: a stage name (its artifact under the "
                                   "current config, else its latest), an identity prefix, or an artifact's URL.")
    p.add_argument("artifact", metavar="ARTIFACT")
    p.add_argument("--all", action="store_true", help="every matching record, newest first")
    _add_config_args(p)
    p.set_defaults(func=cmd_lineage)

    p = sub.add_parser("compare", help="every evaluated model under the root side by side (+ FID vs GFLOPs PNG)",
                       description="One row per complete evaluation recorded under storage.root: FID, KID, IS, "
                                   "precision, recall, rFID, GFLOPs per image, training steps and time, tokens per "
                                   "image, identities, and the settings of every stage it was built from. Also "
                                   "draws FID against GFLOPs per image.")
    p.add_argument("--only-changed", action="store_true", help="only the settings that differ between rows")
    p.add_argument("--format", choices=["md", "csv", "json"], default="md", help="table format (default: md)")
    p.add_argument("--png", default=None, metavar="PATH",
                   help="where to draw FID vs GFLOPs (default: <storage.root>/reports/compare.png; - for none)")
    _add_config_args(p)
    p.set_defaults(func=cmd_compare)

    # One command per stage: the pipeline up to and including it (earlier stages are reused when done).
    stage_commands = [
        ("shard", "class folders / ImageNet / embedded → webdataset tars + Parquet manifest",
         "Run the shard stage alone: tars, manifest.parquet and classes.json under <storage.root>/shards/. "
         "Source: -o data.source=PATH|URL|embedded."),
        ("decompose", "shard tars → base/detail factors (Ambrosio–Tortorelli) in Zarr",
         "Run the stages up to decompose: B_1…B_n per image under <storage.root>/factors/ "
         "(settings: -o decompose.alpha=… etc.)."),
        ("train_tokenizer", "shards + factors → a trained base-detail VQ-VAE (CART §3.2)",
         "Run the stages up to train_tokenizer: tokenizer.pt, metrics, curves.png and reconstructions.png under "
         "<storage.root>/tokenizer/. Resumes from its last checkpoint when interrupted "
         "(settings: -o tokenizer.steps=… etc.)."),
        ("tokenize", "shards + factors + tokenizer → the shared token cache (Zarr, by identity)",
         "Run the stages up to tokenize: every image's token maps under "
         "<tokens.cache or storage.root>/tokens/<identity>/. A complete cache with the same identity there "
         "(e.g. a team bucket: -o tokens.cache=s3://bucket/prefix) is verified and reused instead of encoding."),
        ("train_ar", "token cache → the next-detail transformer (CART §3.3)",
         "Run the stages up to train_ar: transformer.pt, best.pt, metrics.csv and loss.png under "
         "<storage.root>/transformer/. Resumes from its last checkpoint; -o ar.nproc=N trains N processes with torchrun."),
    ]
    for stage, help_text, description in stage_commands:
        p = sub.add_parser(stage.replace("_", "-"), help=help_text, description=description)
        _add_config_args(p)
        p.add_argument("--force", action="append", type=stage_name, default=[], metavar="STAGE",
                       help="rebuild STAGE (this one or an earlier one) from scratch (repeatable)")
        p.set_defaults(func=cmd_run, until=stage)

    p = sub.add_parser("sample", help="class-conditional samples with CFG: PNGs, grids, a webdataset tar",
                       description="Without --ckpt: run the pipeline up to its sample stage (outputs under "
                                   "<storage.root>/samples/). With --ckpt: sample that transformer.pt/best.pt into --out.")
    p.add_argument("--ckpt", default=None, metavar="PATH", help="a transformer.pt or best.pt of train-ar")
    p.add_argument("--out", default="nextdetail-samples", help="with --ckpt: output directory (default: %(default)s)")
    p.add_argument("--classes", type=int, nargs="+", default=None, metavar="C", help="class indices (default: all)")
    p.add_argument("--n", type=int, default=None, help="samples per class")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance at the last map")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--upscale", type=int, default=None, help="also ×N by upscaled base + patch-wise detail; 1: off")
    p.add_argument("--budget", type=float, default=None,
                   help="NDP: fraction of the full pyramid's refinements per image (0 < b ≤ 1)")
    p.add_argument("--estimator", default=None, choices=["learned", "entropy", "oracle", "random", "uniform"],
                   help="NDP: which patches to refine first")
    p.add_argument("--refine-per-step", type=int, default=None, help="NDP: patches refined per forward pass")
    p.add_argument("--detail-budget", type=float, default=None,
                   help="CART: fraction of latent patches that get detail tokens (the hardest; base-only elsewhere)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    _add_config_args(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("evaluate", aliases=["eval"],
                       help="FID / IS / KID / precision-recall (torch-fidelity), rFID, a report",
                       description="Without --ckpt: run the pipeline up to its evaluate stage (outputs under "
                                   "<storage.root>/metrics/). With --ckpt: evaluate those transformer.pt/best.pt files into "
                                   "--out. Reference statistics are cached by content under <eval.reference_cache or "
                                   "storage.root>/refstats/.")
    p.add_argument("--ckpt", action="append", default=None, metavar="PATH",
                   help="a transformer.pt or best.pt of train-ar (repeat for several)")
    p.add_argument("--out", default="nextdetail-eval", help="with --ckpt: output directory (default: %(default)s)")
    p.add_argument("--reference", default=None, help="a split name (train, val) or a folder of images / an .npz batch")
    p.add_argument("--n", type=int, default=None, help="generated images per class")
    p.add_argument("--extractor", default=None, choices=["inception-v3-compat", "nextdetail-randconv-v1"])
    p.add_argument("--checkpoints", default=None, choices=["last", "best", "all"])
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    _add_config_args(p)
    p.set_defaults(func=cmd_eval)

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
        _add_config_args(c)
        if name == "accept":
            c.add_argument("stage", metavar="STAGE", help="the stage (either spelling: train-ar, train_ar)")
        if name in ("push", "pull", "verify"):
            c.add_argument("--stage", action="append", default=None, metavar="STAGE",
                           help="only this stage (repeat for more)")
            c.add_argument("--jobs", type=_positive, default=16, metavar="N",
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

    p = sub.add_parser("show", help="write pictures of stage outputs")
    ssub = p.add_subparsers(dest="show_command", required=True, metavar="WHAT")
    e = ssub.add_parser("decomposition", help="one PNG strip per image: I, B_1…B_n, D_1…D_n (CART Fig. 3)",
                        description="Write a PNG strip per KEY (the manifest's key column): the image, its base "
                                    "factors and its detail layers (contrast-stretched around grey).")
    e.add_argument("keys", nargs="+", metavar="KEY")
    e.add_argument("--out", default="nextdetail-figures", help="directory for the PNGs (default: %(default)s)")
    _add_config_args(e)
    e.set_defaults(func=cmd_show_decomposition)

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
    args = build_parser().parse_args(argv)  # --help and usage errors end here, having written nothing
    configure_environment(verbose=getattr(args, "verbose", False))
    signal.signal(signal.SIGINT, _interrupted)
    signal.signal(signal.SIGTERM, _interrupted)
    if args.func in (cmd_run, cmd_sample, cmd_eval, cmd_serve, cmd_show_decomposition):  # they start processes
        from nextdetail.flows.runtime import watch_parent

        watch_parent()
    try:
        args.func(args)
    except UserError as err:
        print(f"nextdetail: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `nextdetail status | head`
        sys.stderr.close()
        return 0
    except Exception as err:
        from nextdetail.errors import credentials_problem

        line = credentials_problem(err)
        if line is None:
            raise
        print(f"nextdetail: {line}", file=sys.stderr)
        return 2
    return 0


INTERRUPTED = "interrupted — re-run the same command to resume"
"""What Ctrl-C prints; `serve` replaces it with what stopping a server means (`cmd_serve`)."""


def _interrupted(signum: int, frame: object) -> None:
    """Ctrl-C (or SIGTERM): stop now — end every child (Prefect's server, the Dask cluster, torchrun ranks),
    say so in one line and exit 130 without unwinding through Prefect and Dask (minutes, and tracebacks).
    Every write is atomic, so the re-run resumes from what was finished."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    print(f"nextdetail: {INTERRUPTED}", file=sys.stderr, flush=True)
    # From here on this process's threads (Prefect's, Dask's nannies and scheduler) see their peers go: what
    # they would log about it, and anything a nanny restarts, writes nowhere.
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        os.dup2(devnull, fd)
    from nextdetail.flows.runtime import end_children

    end_children()
    os._exit(130)


if __name__ == "__main__":
    sys.exit(main())
