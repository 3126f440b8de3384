"""The `nextdetail` command line. Every output lives under `storage.root`.

One module per command group, each with its parsers beside its handlers: `run` (run, status, lineage, serve),
`stage_commands` (one command per stage; sample and evaluate with their flags), `cache`, `compare`, `show`, `data` (data,
config); `common` holds what they share. Handlers load the config and call the stages and the cache modules;
none reads a store itself.

Errors the user can fix (bad config, bad paths) print one line and exit 2; tracebacks are for bugs.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

from nextdetail.cli import cache, common, compare, data, plan, run, show, stage_commands
from nextdetail.errors import UserError
from nextdetail.pipeline.runtime import configure_environment

GROUPS = (run, plan, stage_commands, cache, compare, show, data)  # in `nextdetail --help`'s order


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nextdetail", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # --help and usage errors end here, having written nothing
    configure_environment(verbose=getattr(args, "verbose", False))
    signal.signal(signal.SIGINT, _interrupted)
    signal.signal(signal.SIGTERM, _interrupted)
    if getattr(args, "starts_processes", False):  # a Prefect server, a Dask cluster, torchrun ranks
        from nextdetail.pipeline.runtime import watch_parent

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


def _interrupted(signum: int, frame: object) -> None:
    """Ctrl-C (or SIGTERM): stop now — end every child (Prefect's server, the Dask cluster, torchrun ranks),
    say so in one line and exit 130 without unwinding through Prefect and Dask (minutes, and tracebacks).
    Every write is atomic, so the re-run resumes from what was finished."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    print(f"nextdetail: {common.INTERRUPTED}", file=sys.stderr, flush=True)
    # From here on this process's threads (Prefect's, Dask's nannies and scheduler) see their peers go: what
    # they would log about it, and anything a nanny restarts, writes nowhere.
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        os.dup2(devnull, fd)
    from nextdetail.pipeline.runtime import end_children

    end_children()
    os._exit(130)
