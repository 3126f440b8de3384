"""Process set-up for Prefect and Dask. Import and call `configure_environment` before `prefect`.

- Prefect runs against its ephemeral local server unless PREFECT_API_URL names a real one. The
  server is started once here and its URL exported, so Dask worker processes (which inherit the
  environment) talk to it instead of each starting a server of their own.
- Nothing tries the network: analytics and telemetry are off; PREFECT_HOME defaults to
  ``./.nextdetail/prefect`` so state stays with the project.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nextdetail.errors import UserError

ENV_DEFAULTS = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.5",
    "PREFECT_UI_ENABLED": "false",
}


HEARTBEAT_SETTINGS = ("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY")
QUIET = {
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",  # the terminal handler only: the UI still gets INFO
    "DASK_LOGGING__DISTRIBUTED": "warning",
}


def configure_environment(work_dir: str | Path = ".nextdetail", verbose: bool = False) -> None:
    """Set Prefect's environment defaults (a user's own settings win). Call before importing prefect. Unless
    `verbose`, Prefect's and Dask's own INFO logs stay off the terminal (our progress bars and summaries show)."""
    for key, value in {**ENV_DEFAULTS, **({} if verbose else QUIET)}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PREFECT_HOME", str(Path(work_dir, "prefect").resolve()))
    # Importing prefect tries to make PREFECT_HOME's last directory and warns when its parent (`./.nextdetail`) is
    # not there yet — a fresh clone's first run; `prefect_api` makes the whole path before the server needs it,
    # and nothing is written before the checks of the front door pass.
    warnings.filterwarnings("ignore", message="Failed to create the Prefect home directory", category=UserWarning)


@contextlib.contextmanager
def prefect_api() -> Iterator[str]:
    """Yield the API URL in use: PREFECT_API_URL if set, else a freshly started ephemeral server."""
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)  # the ephemeral server's database, a CA file
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()  # the CLI's watchdog (`watch_parent`) ends it if this process is killed
        with _children_write_to(Path(os.environ["PREFECT_HOME"], "server.log")):
            server.start(timeout=int(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]))
        url = server.api_url
        # Not stopped by hand at exit: Prefect's own atexit handling does it (stopping it here can hang).
        os.environ["PREFECT_API_URL"] = url
    _light_tls_context_for_plain_http(url)
    _quiet_user_errors()
    updates: dict[Any, Any] = {PREFECT_API_URL: url}
    if not any(k in os.environ for k in HEARTBEAT_SETTINGS):
        # Prefect ends every flow run by joining its heartbeat thread, which sleeps in 1 s steps: each stage's
        # subflow (and the pipeline's flow) took up to 1 s more than its work (a bare flow: 1.05 s, 0.06 s without).
        # Heartbeats only feed a server-side automation that marks silent runs crashed; the CLI ends its own runs
        # (Ctrl-C included). Setting PREFECT_FLOWS_HEARTBEAT_FREQUENCY keeps them.
        updates[PREFECT_FLOWS_HEARTBEAT_FREQUENCY] = None
    with temporary_settings(updates=updates):
        yield url


@contextlib.contextmanager
def _children_write_to(log: Path) -> Iterator[None]:
    """Processes started inside inherit `log` as their stdout and stderr, not the terminal. The ephemeral server
    prints its own errors there (e.g. SQLite's "database is locked" while its event recorder retries a write,
    seen during long benchmarks): server chatter, kept in PREFECT_HOME/server.log rather than on the terminal."""
    import sys

    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    try:
        with open(log, "ab") as f:
            for fd in saved:
                os.dup2(f.fileno(), fd)
        yield
    finally:
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)


WATCHDOG = """
import os, sys, time
import psutil
parent = psutil.Process(int(sys.argv[1]))
me = os.getpid()
family = []
try:
    while parent.is_running() and parent.status() != psutil.STATUS_ZOMBIE:
        family = [p for p in parent.children(recursive=True) if p.pid != me]  # server, Dask workers, ranks
        time.sleep(0.5)
except psutil.Error:
    pass
for p in family:
    try:
        p.terminate()
    except psutil.Error:
        pass
_, alive = psutil.wait_procs(family, timeout=3)
for p in alive:
    try:
        p.kill()
    except psutil.Error:
        pass
"""


def watch_parent() -> None:
    """What this process starts (the ephemeral Prefect server, the Dask cluster, torchrun ranks) must not
    outlive it, even SIGKILLed (they would keep running under ppid 1): a small watchdog in its own session
    keeps the list of this process's descendants and ends them when this process is gone."""
    import subprocess
    import sys

    subprocess.Popen([sys.executable, "-c", WATCHDOG, str(os.getpid())], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def end_children(grace: float = 3.0) -> None:
    """SIGTERM every process this one started (Prefect's server, Dask's nannies and workers, torchrun ranks),
    SIGKILL whatever is left after `grace` seconds. Asked again until none is left: a Dask nanny (a thread of
    this process) restarts a worker whose process ends. What they wrote is atomic: a re-run resumes."""
    import time

    import psutil

    deadline = time.monotonic() + grace
    while (children := psutil.Process().children(recursive=True)) and time.monotonic() < deadline + grace:
        late = time.monotonic() > deadline
        for p in children:
            with contextlib.suppress(psutil.Error):
                p.kill() if late else p.terminate()
        psutil.wait_procs(children, timeout=0.3)


def dask_setup(worker: Any) -> None:
    """Dask preload hook (this module is preloaded into every LocalCluster worker). A terminal's Ctrl-C goes to
    the whole process group; the CLI owns it and ends the workers itself (`end_children`), so a worker neither
    stops half-way on its own nor is restarted by its nanny to find the scheduler gone."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.getLogger("distributed.worker").addFilter(_NoHeartbeatFailure())


class _NoHeartbeatFailure(logging.Filter):
    """A LocalCluster worker whose heartbeat is in flight when the CLI closes the scheduler logs the closed stream
    with its traceback on the terminal, after the run's own last line (seen once after a one-line config error).
    The CLI owns that scheduler: when it goes, the worker's connection closes and the worker with it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to communicate with scheduler during heartbeat")


class _NoUserErrorTracebacks(logging.Filter):
    """A `UserError` (bad config or data) reaches the user as the CLI's one line; Prefect's console copies of
    it — the traceback and the "Finished in state Failed" line — are dropped there (the UI keeps them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from nextdetail.errors import UserError

        if record.exc_info and isinstance(record.exc_info[1], UserError):
            return False
        return "UserError" not in record.getMessage()


def _quiet_user_errors() -> None:
    from prefect.logging.handlers import PrefectConsoleHandler

    for logger in (logging.getLogger(), *[logging.getLogger(n) for n in ("prefect", "prefect.flow_runs",
                                                                          "prefect.task_runs")]):
        for handler in logger.handlers:
            if isinstance(handler, PrefectConsoleHandler) and not any(
                    isinstance(f, _NoUserErrorTracebacks) for f in handler.filters):
                handler.addFilter(_NoUserErrorTracebacks())


def _light_tls_context_for_plain_http(url: str) -> None:
    """An http:// API never uses TLS, yet Prefect builds a verified SSL context from certifi's whole
    bundle for every client it opens (~20 ms each, dozens per task run: a measurable share of a
    shard task). Point it at a one-certificate file instead (~1 ms). Exported, so Dask workers
    started afterwards inherit it; a user's own PREFECT_API_SSL_CERT_FILE wins."""
    if not url.startswith("http://") or os.environ.get("PREFECT_API_SSL_CERT_FILE"):
        return
    import certifi

    bundle = Path(certifi.where()).read_text()
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    first = bundle[bundle.index(begin) : bundle.index(end) + len(end)] + "\n"
    path = Path(os.environ["PREFECT_HOME"], "one-ca.pem")
    if not path.exists() or path.read_text() != first:
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(first)
        tmp.replace(path)
    os.environ["PREFECT_API_SSL_CERT_FILE"] = str(path)


# Dask's periodic bookkeeping, set for workers that run one long task at a time (a tar, a class group) on a
# machine whose cores those tasks need. By default the statistical profiler samples every worker thread's stack
# 100×/s (GIL churn: ≈ 20 % of the throughput of image-bound tasks), and every scheduler, nanny and worker measures
# its event loop every 20 ms and its memory every 100 ms: an idle 2-worker cluster took 10.7 % of a core, 1.5 % with
# these (tokenize on 2 workers: nannies 0.30 → 0.02 CPU-s, scheduler 0.25 → 0.13). A blocked event loop is still
# reported past `distributed.admin.tick.limit` (3 s), and the memory limits still act within half a second. The
# pipeline's own LocalCluster uses them; external `dask scheduler` / `dask worker` processes read them from the
# environment (`quiet_dask_environ`, README "Running on a cluster").
QUIET_DASK: dict[str, Any] = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "500ms",
    "distributed.worker.memory.monitor-interval": "500ms",
    "distributed.admin.system-monitor.interval": "2s",
}


def quiet_dask_environ() -> dict[str, str]:
    """QUIET_DASK as the environment variables Dask reads at start-up (`DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL`…)."""
    return {"DASK_" + key.upper().replace(".", "__").replace("-", "_"): str(value)
            for key, value in QUIET_DASK.items()}


@contextlib.contextmanager
def dask_cluster(address: str | None, n_workers: int | None, threads_per_worker: int, memory_limit: str,
                 resources: dict[str, float] | None = None) -> Iterator[str]:
    """Yield a scheduler address: `address` as given, else a LocalCluster of worker processes that
    lives for the whole pipeline run (started once, shared by every parallel stage), each worker offering
    `resources` (as `dask worker --resources`)."""
    if address:
        yield address
        return
    import dask
    from distributed import LocalCluster

    # QUIET_DASK (the profiler off, slower bookkeeping): workers inherit this config from the nanny, which
    # captures it at start-up and hands it to (re)started workers; the scheduler reads it as it starts here.
    # Dask also exports MALLOC_TRIM_THRESHOLD_=65536 to its workers, and setting any glibc malloc
    # threshold turns off glibc's adaptive mmap threshold: every decoded image or tensor above 128 KiB
    # is then mmap'ed and page-faulted afresh (measured 10–20% more CPU for the shard loop). Our
    # workers allocate and free same-sized buffers all run long, which the adaptive default reuses.
    # A user's own MALLOC_TRIM_THRESHOLD_ in the environment is still inherited.
    with dask.config.set({**QUIET_DASK, "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        cluster = LocalCluster(
            n_workers=n_workers or os.cpu_count() or 1,
            threads_per_worker=threads_per_worker,
            processes=True,
            memory_limit=memory_limit,
            dashboard_address=":0",  # a free port: concurrent runs never collide
            # Workers import the stage code (and Prefect) at start-up, not inside the first task.
            preload=["nextdetail.stages.shard.tasks", "nextdetail.stages.decompose.tasks", __name__],
            silence_logs=logging.WARNING,
            resources=resources or None,
        )
    try:
        yield cluster.scheduler_address
    finally:
        # Ending the cluster is ours: a nanny whose worker is slow to exit on a loaded machine ("still alive
        # after 4.0 seconds, killing") kills it as asked; that warning is not news for the terminal.
        nanny = logging.getLogger("distributed.nanny")
        level = nanny.level
        nanny.setLevel(logging.ERROR)
        try:
            cluster.close()
        finally:
            nanny.setLevel(level)


def worker_resources(address: str) -> list[tuple[str, dict[str, float]]]:
    """(host, resources) of every worker of the Dask scheduler at `address`; one line when it cannot be reached.
    Each worker's malloc is restored on the way (`restore_malloc`)."""
    from distributed import Client

    try:
        with Client(address, timeout=30) as client:
            workers = client.scheduler_info(n_workers=-1)["workers"].values()
            client.run(restore_malloc)
    except OSError as err:
        raise UserError(f"dask.address={address}: no Dask scheduler answers there ({type(err).__name__}); start "
                        "one (`dask scheduler`) or unset dask.address") from None
    return [(w.get("host", ""), dict(w.get("resources") or {})) for w in workers]


@dataclass(frozen=True)
class WorkerAsk:
    """What a stage's tasks ask of the Dask workers under one config: `resources` (named by `setting`) on one worker,
    or on `nodes` workers on distinct hosts (named by `nodes_setting`: a training spanning hosts)."""

    setting: str
    resources: dict[str, float]
    nodes: int = 1
    nodes_setting: str | None = None


def check_resources(asks: dict[str, WorkerAsk], address: str | None, local: dict[str, float] | None) -> None:
    """Before any work: every stage that asks the Dask workers for resources or hosts ({stage: ask}) finds them —
    a worker offering all of them (on `ask.nodes` distinct hosts) on the cluster at `address`, else on the
    LocalCluster whose workers offer `local` (`dask.resources`, one host). A task asking for what no worker has
    would wait forever, a training short of hosts would wait for the missing nodes: one line instead."""
    asks = {stage: ask for stage, ask in asks.items() if ask.resources or ask.nodes > 1}
    if not asks:
        return
    workers = worker_resources(address) if address else [("localhost", dict(local or {}))]
    where = f"the Dask cluster at {address}" if address else "the LocalCluster (dask.resources)"
    for stage, ask in asks.items():
        setting, wanted = ask.setting, ask.resources
        offering = [host for host, offered in workers if all(offered.get(k, 0.0) >= v for k, v in wanted.items())]
        if not offering:
            offers = sorted({", ".join(f"{k}={v:g}" for k, v in sorted(o.items())) or "none" for _, o in workers})
            missing = next(k for k, v in wanted.items() if not any(o.get(k, 0.0) >= v for _, o in workers))
            raise UserError(
                f"{stage}: {setting} asks for {missing}={wanted[missing]:g}, and no worker of {where} offers it "
                f"({len(workers)} worker(s), offering: {'; '.join(offers)}); start workers with "
                f"`dask worker --resources {missing}={wanted[missing]:g}` (or set dask.resources), or unset {setting}")
        hosts = sorted(set(offering))
        if len(hosts) < ask.nodes:
            what = f"offering {setting}={_resources_text(wanted)}" if wanted else "at all"
            raise UserError(
                f"{stage}: {ask.nodes_setting}={ask.nodes} needs workers on {ask.nodes} distinct hosts, and {where} "
                f"has {len(hosts)} host(s) with workers {what} ({', '.join(hosts)}); start `dask worker` on more "
                f"hosts, or lower {ask.nodes_setting}")


def _resources_text(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


def run_flow(flow: Any, dask: Any, on_cluster: bool, scheduler: str | None, *args: Any, **kwargs: Any) -> Any:
    """A stage's flow called with `args`/`kwargs`: in this process, or (`on_cluster`) with its tasks on the Dask
    scheduler at `scheduler` — default `dask` (the config's section): its `address`, else a LocalCluster for this
    call. Either way its task runs are created without the run's tags (`untagged_threads`)."""
    if not on_cluster:
        return flow.with_options(task_runner=untagged_threads(flow.task_runner))(*args, **kwargs)
    with dask_cluster(**{**dask.model_dump(), "address": scheduler or dask.address}) as address:
        return flow.with_options(task_runner=dask_task_runner(address))(*args, **kwargs)


def untagged_threads(runner: Any) -> Any:
    """`runner` (a flow's thread-pool task runner), its task runs created without the run's tags.

    A pipeline run is tagged (`tags(preset:…, model:…, commit:…)`: what the UI filters runs by), and Prefect gives
    every task run created inside it the same tags. For each tagged task run its task engine then asks the API for
    a tag concurrency slot: a round trip on the task's critical path (two where a limit exists), a write
    transaction on the server that competes with the run recorder for SQLite's lock (a loaded CI machine saw one
    time out: 503; issue 40). We set no tag concurrency limits, so the flow runs keep the tags and task runs go
    without.
    A runner of another kind is returned as it is; the Dask runner does the same (`dask_task_runner`)."""
    from prefect.context import TagsContext
    from prefect.task_runners import ThreadPoolTaskRunner

    if type(runner) is not ThreadPoolTaskRunner:
        return runner

    class _UntaggedThreadPoolTaskRunner(ThreadPoolTaskRunner):
        def submit(self, *args: Any, **kwargs: Any) -> Any:
            with TagsContext(current_tags=set()):  # the worker thread runs in a copy of the context at submit
                return super().submit(*args, **kwargs)

    return _UntaggedThreadPoolTaskRunner(max_workers=runner._max_workers)


def on_workers_offering(resources: dict[str, float] | None) -> Any:
    """A context in which tasks submitted to the Dask task runner run only on workers offering `resources`
    (`dask.annotate`); no constraint when None."""
    import contextlib

    if not resources:
        return contextlib.nullcontext()
    import dask

    return dask.annotate(resources=dict(resources))


def dask_task_runner(address: str) -> Any:
    """Prefect's Dask task runner on the scheduler at `address`, submitting each task run with the flow's context
    serialized once and with ``pure=False``.

    prefect-dask's client serializes the whole Prefect context for every task it submits: the settings and the
    flow run's parameters (our config, the upstream results), visited for secrets to render — ≈ 80 ms of the
    flow process's CPU per task on this 2-core machine, taken from the workers (issue 40). Within one flow run
    that context does not change, so it is serialized on the first submit and reused; only the per-task asset
    context is built each time. And prefect-dask submits "pure" tasks, so Dask hashes every submission to name
    it (the closure pickled by value, the serialized settings included: ≈ 70 ms more); Prefect gives each task
    run its own id and does its own caching, so that hash buys nothing.

    Each task run travels to its worker as one pickled blob (`_run_pickled_task_run`), the flow's context inside it
    pickled once per flow run. Dask's scheduler unpickles every graph it is sent to find its dependencies: handed
    the Prefect task and its arguments, it imported what they reference (torch, Prefect, the stage modules: ≈ 2.5 s
    before it scheduled a fresh cluster's first task, on the workers' cores here) and unpickled every task's
    context again. A blob is opaque bytes to it, and what it does unpickle (`_run_pickled_task_run`) lives in
    this import-light module. Task runs handed Dask futures as arguments (none of our stages) go as before, so
    Dask still resolves them. The context travels without the run's tags, as `untagged_threads` says why."""
    import pickle

    import cloudpickle
    from prefect_dask import DaskTaskRunner
    from prefect_dask.task_runners import PrefectDaskFuture

    class _ImpureDaskTaskRunner(DaskTaskRunner):
        _flow_context: tuple[Any, dict[str, Any], bytes] | None = None  # (flow run id, its context, pickled)

        def submit(self, task: Any, parameters: dict[str, Any], wait_for: Any = None, dependencies: Any = None) -> Any:
            import uuid

            from distributed import Client, Future
            from prefect.context import AssetContext, FlowRunContext, serialize_context
            from prefect.utilities.engine import collect_task_run_inputs_sync

            if not self._started:
                raise RuntimeError("The task runner must be started before submitting work.")
            flow_run = FlowRunContext.get()
            run_id = flow_run.flow_run.id if flow_run and flow_run.flow_run else None
            if self._flow_context is None or self._flow_context[0] != run_id:
                flow_context = {**serialize_context(), "tags_context": {}}  # task runs untagged: `untagged_threads`
                self._flow_context = (run_id, flow_context, cloudpickle.dumps(flow_context))
            task_run_id = uuid.uuid4()
            parameters = self._optimize_futures(parameters)
            inputs = {k: collect_task_run_inputs_sync(v, future_cls=Future) for k, v in parameters.items()}
            for k, more in (dependencies or {}).items():
                inputs[k] = inputs.get(k, set()) | set(more)
            asset_context = AssetContext.from_task_and_inputs(
                task=task, task_run_id=task_run_id, task_inputs=inputs, copy_to_child_ctx=True).serialize()
            key = f"{task.name}-{task_run_id}"
            if wait_for or _holds(parameters, Future):  # Dask must see the futures to wait for and pass them
                future = Client.submit(  # the plain client's submit: the Prefect wrapper is ours (`_run_task_run`)
                    self.client, _run_task_run, key=key, pure=False, task=task, task_run_id=task_run_id,
                    wait_for=self._optimize_futures(wait_for) if wait_for else None, return_type="state",
                    parameters=parameters, dependencies=inputs,
                    context={**self._flow_context[1], "asset_context": asset_context})
            else:
                blob = cloudpickle.dumps(dict(task=task, task_run_id=task_run_id, parameters=parameters,
                                              dependencies=inputs, asset_context=asset_context),
                                         protocol=pickle.HIGHEST_PROTOCOL)
                future = Client.submit(self.client, _run_pickled_task_run, blob, self._flow_context[2], key=key,
                                       pure=False)
            future.task_run_id = task_run_id
            return PrefectDaskFuture(wrapped_future=future, task_run_id=task_run_id)

        def submit_part(self, task: Any, args: tuple[Any, ...]) -> Any:
            """`task.fn(*args)` (a stage task's body: one part of a fan-out) as a plain Dask task, not a Prefect
            task run → its Dask future, whose result is (the body's result, the retries it took:
            `_run_pickled_part`). Pickled into one blob for the reason `submit` gives."""
            import uuid

            from distributed import Client

            delays = task.retry_delay_seconds
            blob = cloudpickle.dumps((task.fn, args, task.retries or 0, list(delays) if isinstance(delays, list | tuple)
                                      else [float(delays or 0)]), protocol=pickle.HIGHEST_PROTOCOL)
            return Client.submit(self.client, _run_pickled_part, blob, key=f"{task.name}-{uuid.uuid4()}", pure=False)

    return _ImpureDaskTaskRunner(address=address)


def _run_pickled_part(blob: bytes) -> tuple[Any, list[str]]:
    """One part of a fan-out on a Dask worker (`submit_part`) → (its result, a line per retry it took).

    What Prefect did for a part's task run, done here: retried, after the task's own delays, while the failure is
    transient (`tasks.is_transient`: I/O and infrastructure, never bad settings or data), at most the task's
    `retries` times. A worker that dies is Dask's to handle: it runs the part again on another worker."""
    import pickle
    import time

    from nextdetail.pipeline.tasks import is_transient

    restore_malloc()
    fn, args, retries, delays = pickle.loads(blob)
    retried: list[str] = []
    while True:
        try:
            return fn(*args), retried
        except Exception as exc:
            if len(retried) >= retries or not is_transient(exc):
                raise
            delay = delays[min(len(retried), len(delays) - 1)]
            retried.append(f"{type(exc).__name__}: {exc}"[:300] + f"; retry {len(retried) + 1}/{retries} in {delay:g} s")
            time.sleep(delay)


def _holds(value: Any, kind: type) -> bool:
    """Whether `value` (a task run's parameters) holds an instance of `kind` anywhere inside."""
    from prefect.utilities.collections import visit_collection

    found: list[Any] = []
    visit_collection(value, lambda x: found.append(x) if isinstance(x, kind) else None, return_data=False)
    return bool(found)


def _run_pickled_task_run(blob: bytes, flow_context: bytes) -> Any:
    """`_run_task_run` of a task run pickled by the flow's process (`dask_task_runner`), in its flow's context."""
    import pickle

    kwargs = pickle.loads(blob)
    context = {**_flow_context_of(flow_context), "asset_context": kwargs.pop("asset_context")}
    return _run_task_run(**kwargs, context=context, return_type="state", wait_for=None)


@functools.lru_cache(maxsize=4)  # a worker serves a few flow runs at a time; thread-safe for a worker's threads
def _flow_context_of(pickled: bytes) -> dict[str, Any]:
    """The flow context a task run carries, unpickled once per worker process and flow run, its settings built once.

    Prefect rebuilds its settings from the serialized context for every task run (`hydrated_context` →
    `Settings(**…)`): pydantic-settings then reads the environment, .env files, the profiles and pyproject.toml
    afresh: most of a trivial task run's time on a `dask worker` (issue 40; `benchmarks/task_overhead.py`: 45 ms
    per task run, 11.5 ms with this). Given the built `Settings` and `Profile` instead of their dicts,
    pydantic takes them as they are. They are the same values: the settings the flow's process serialized. Callers
    copy the dict before adding to it."""
    import pickle

    from prefect.context import SettingsContext

    context = pickle.loads(pickled)
    if context.get("settings_context"):
        built = SettingsContext(**context["settings_context"])
        context["settings_context"] = {"profile": built.profile, "settings": built.settings}
    return context


DASK_MALLOC_TRIM = ("MALLOC_TRIM_THRESHOLD_", "65536")  # what every `dask worker`'s nanny exports by default


def restore_malloc() -> None:
    """Undo, in a Dask worker process, what Dask's default MALLOC_TRIM_THRESHOLD_=65536 does to compute-bound work.

    Setting any glibc malloc threshold turns off glibc's adaptive mmap threshold: every tensor or decoded image
    above 128 KiB is then mmap'ed, page-faulted in and unmapped afresh. Measured on an external `dask worker`
    (issue 40): the tokenizer's encoding loop over tiny's 17 tars took 16.3 s there and 9.8 s in a plain process;
    with the thresholds below, 9.1 s. They are where glibc's own adaptation ends up (large buffers reused from
    the heap, up to 32 MiB); a threshold a user configured to another value is kept. The variable is then removed,
    so the processes the worker starts (torchrun's agents and ranks) have glibc's default. Called by every task
    run on a worker, and on every worker of an external cluster when the run starts (`worker_resources`, so a
    node that only launches a torchrun agent has it too). The LocalCluster the CLI starts never exports it
    (`dask_cluster`). A no-op off glibc."""
    name, value = DASK_MALLOC_TRIM
    if os.environ.get(name) != value:  # not a Dask worker, a user's own value, or restored already
        return
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_trim_threshold, 64 << 20)
    del os.environ[name]  # what this worker starts (torchrun's agents and ranks) gets glibc's own adaptation


def _run_task_run(**kwargs: Any) -> Any:
    """A Prefect task run on a Dask worker (every stage task is synchronous)."""
    from prefect.task_engine import run_task_sync

    restore_malloc()

    if kwargs["task"].isasync:
        raise TypeError(f"task {kwargs['task'].name} is async; stage tasks are synchronous")
    return run_task_sync(**kwargs)
