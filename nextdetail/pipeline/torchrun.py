"""Training stages on several processes and hosts: torchrun launched and supervised by the stage's Prefect task.

One node (`launch`): the task writes its job as JSON to a temporary file and runs
``python -m torch.distributed.run --standalone --nproc-per-node=N -m <stage module> <job>`` where the task runs (the
flow's process, or the Dask worker the flow placed it on). Several nodes (`launch_nodes`, `ar.nodes`): the task runs
on one Dask worker (node 0); it picks a worker on each of N−1 other hosts offering the same resources, starts a
torchrun agent there through Dask (`run_node`) and one itself, all meeting at a c10d rendezvous that node 0's agent
hosts. Every rank rebuilds the job (`training.training_of_job`) and trains its share (`world_from_env`); rank 0
writes checkpoints and outputs to the shared store. The task relays the agents' output to Prefect's log; a group
that fails raises ChildProcessError — an OSError, so an infrastructure failure that Prefect retries, and the retry
resumes from the last checkpoint.

The job is JSON, never a pickle: a job file on a shared disk must not be code. Credentials (SecretStr values of
storage options) are not in it either: they reach the ranks through their launcher's environment
(`NEXTDETAIL_JOB_SECRETS`), and over the Dask connection to another host's agent, as every task's arguments do.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from nextdetail.errors import UserError

JOB_SECRETS_ENV = "NEXTDETAIL_JOB_SECRETS"  # the job's secret values (a JSON list), for the ranks to inherit
NODE_ENV = "NEXTDETAIL_NODE"  # {"host", "pid"} of the process that launched this node's ranks (JSON)
SECRET_SLOT = "$secret"  # {"$secret": i} in a job file: the i-th value of JOB_SECRETS_ENV
HOSTS_WAIT_SECONDS = 60.0  # node 0 waits this long for workers on enough hosts (one restarting after a crash)
AGENTS_END_SECONDS = 120.0  # how long node 0 waits for the other agents once its own has succeeded
STOPPED_AGENTS_SECONDS = 30.0  # … once it has set the stop event (they end theirs: SIGTERM, 10 s, SIGKILL)


def world_from_env() -> tuple[int, int, int]:
    """(rank, world, local_rank) as torchrun sets them; (0, 1, 0) in a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def process_count(nproc: int | None, device: str) -> int:
    """`nproc`, or one per visible GPU when None (1 on CPU)."""
    if nproc is not None:
        return nproc
    return max(1, torch.cuda.device_count()) if device == "cuda" else 1


def join(device: str, section: str) -> tuple[int, int, torch.device]:
    """This process's (rank, world, device): its own GPU under torchrun (`LOCAL_RANK`), and the process group
    joined (NCCL on GPUs, gloo on CPU) when there is more than one rank. `section`: the config section whose
    `device` asked for it (for the error)."""
    rank, world, local_rank = world_from_env()
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{section}.device=cuda but no CUDA device is visible; use -o {section}.device=cpu")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return rank, world, dev


# ---- the job: JSON, its secrets apart ------------------------------------------------------------------------


def encode_job(job: dict[str, Any]) -> tuple[str, list[str]]:
    """(the job as JSON text, its secret values): each SecretStr becomes a slot {"$secret": i} naming the i-th value,
    which travels apart from the text (`JOB_SECRETS_ENV`)."""
    from pydantic import SecretStr

    secrets: list[str] = []

    def plain(value: Any) -> Any:
        if isinstance(value, SecretStr):
            secrets.append(value.get_secret_value())
            return {SECRET_SLOT: len(secrets) - 1}
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return value

    return json.dumps(plain(job)), secrets


def decode_job(text: str, secrets: list[str]) -> dict[str, Any]:
    """The job `encode_job` wrote, its secret slots SecretStr again (as validation made them: never shown)."""
    from pydantic import SecretStr

    def filled(value: Any) -> Any:
        if isinstance(value, dict):
            if set(value) == {SECRET_SLOT}:
                return SecretStr(secrets[int(value[SECRET_SLOT])])
            return {k: filled(v) for k, v in value.items()}
        if isinstance(value, list):
            return [filled(v) for v in value]
        return value

    return filled(json.loads(text))


def write_job(directory: str, text: str) -> str:
    path = os.path.join(directory, "job.json")
    with open(path, "w") as f:
        f.write(text)
    return path


def read_job(path: str) -> dict[str, Any]:
    """A rank's job: the JSON file, its secrets from the environment its launcher gave torchrun."""
    with open(path) as f:
        return decode_job(f.read(), json.loads(os.environ.get(JOB_SECRETS_ENV, "[]")))


# ---- where ranks run ----------------------------------------------------------------------------------------


def host_of(address: str) -> str:
    """The host of a Dask address (`tcp://10.0.0.5:40123` → `10.0.0.5`)."""
    hostport = address.split("://", 1)[-1]
    return hostport.rsplit(":", 1)[0].strip("[]")


def this_host() -> str:
    """This process's host as the Dask cluster knows it (a worker's address), else its host name."""
    try:
        from distributed import get_worker

        return host_of(get_worker().address)
    except (ImportError, ValueError):  # not in a Dask worker
        return socket.gethostname()


def this_node() -> dict[str, Any]:
    """Where this rank's node runs: the host and pid of the process that launched its ranks (a Dask worker, the
    flow's process), as the launcher recorded it for them (`NODE_ENV`); this process when nothing launched it."""
    if NODE_ENV in os.environ:
        return json.loads(os.environ[NODE_ENV])
    return {"host": this_host(), "pid": os.getpid()}


def gather_nodes(world: int) -> list[dict[str, Any]]:
    """Every node of the group ({host, pid} of its launcher), in rank order; a collective: every rank calls it."""
    mine = this_node()
    if world == 1:
        return [mine]
    every: list[Any] = [None] * world
    torch.distributed.all_gather_object(every, mine)
    nodes: list[dict[str, Any]] = []
    for node in every:
        if node not in nodes:
            nodes.append(node)
    return nodes


def die_with_parent() -> None:
    """Linux: this process gets SIGKILL when the thread that started it ends — a rank with its torchrun agent."""
    set_death_signal = _death_signal_setter()
    if set_death_signal is not None:
        set_death_signal()


def _death_signal_setter() -> Callable[[], None] | None:
    """On Linux, a function that asks the kernel for SIGKILL to this process when the thread that started it ends
    (prctl PR_SET_PDEATHSIG): a torchrun agent with its Dask worker — a killed worker's ranks must not keep a GPU
    and a rendezvous. Resolved here, so that a child between fork and exec only calls it."""
    if sys.platform != "linux":
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)


# ---- running torchrun ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rendezvous:
    """Where the nodes of one multi-node run meet: node 0's agent hosts the c10d store at `endpoint`."""

    nodes: int
    endpoint: str  # host:port on node 0
    run_id: str  # the artifact's identity and this attempt: a retry never meets an earlier attempt's agents

    @property
    def stop_event(self) -> str:
        """The Dask Event node 0 sets to end the other nodes' agents."""
        return f"nextdetail-stop-{self.run_id}"

    @property
    def log_topic(self) -> str:
        """The Dask event topic the other nodes' agents send their output on."""
        return f"nextdetail-log-{self.run_id}"


def torchrun_command(module: str, job_path: str, nproc: int, rendezvous: Rendezvous | None = None,
                     node_host: str | None = None, hosts_store: bool = False) -> list[str]:
    """torchrun running `module`'s `__main__` on `nproc` ranks: standalone, or as one node of `rendezvous` whose
    address is `node_host` (`hosts_store`: node 0's agent, which hosts the rendezvous store)."""
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if rendezvous is None:
        cmd += ["--standalone", f"--nproc-per-node={nproc}"]
    else:
        # is_host explicit: on a machine with several worker addresses, guessing from the endpoint's host would make
        # every agent there try to host the store.
        cmd += ["--nnodes", str(rendezvous.nodes), "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", rendezvous.endpoint, "--rdzv-id", rendezvous.run_id,
                "--rdzv-conf", f"is_host={int(hosts_store)}", "--local-addr", str(node_host)]
    return [*cmd, "-m", module, job_path]


def agent_environment(secrets: list[str]) -> dict[str, str]:
    """The environment of a torchrun agent started here (its ranks inherit it): the job's secrets, and this
    process as their node's launcher."""
    return {**os.environ, JOB_SECRETS_ENV: json.dumps(secrets),
            NODE_ENV: json.dumps({"host": this_host(), "pid": os.getpid()})}


def run_agent(cmd: list[str], env: dict[str, str], log: Callable[[str], None],
              stop: Callable[[], bool] | None = None) -> int:
    """Run a torchrun agent, relaying its output lines to `log`; its exit code. Its own session: a terminal's Ctrl-C
    reaches the CLI alone, which ends torchrun and its ranks together; it dies with the thread that started it
    (`die_with_parent`). Ended (its whole process group) when `stop()` turns true or this call fails."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True, preexec_fn=_death_signal_setter())
    assert proc.stdout is not None
    relay = threading.Thread(target=lambda: [log(line.rstrip()) for line in proc.stdout], daemon=True)
    relay.start()
    try:
        while True:
            try:
                proc.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                if stop is not None and stop():
                    _end_group(proc)
        relay.join(timeout=10)
        return proc.returncode
    finally:
        if proc.poll() is None:
            _end_group(proc)


def _end_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the agent's process group (the agent and its ranks), SIGKILL what is left after `grace` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)
            return


def launch(stage: str, module: str, job: dict[str, Any], nproc: int, log: Callable[[str], None]) -> None:
    """Run `module`'s `__main__` on `nproc` ranks of this machine under torchrun with `job`; relay their output."""
    text, secrets = encode_job(job)
    with tempfile.TemporaryDirectory(prefix=f"nextdetail-{stage}-") as tmp:
        cmd = torchrun_command(module, write_job(tmp, text), nproc)
        log(f"{stage}: launching {nproc} processes: {' '.join(cmd)}")
        code = run_agent(cmd, agent_environment(secrets), log)
    if code != 0:
        raise ChildProcessError(f"{stage}: torchrun exited with {code}; the retry resumes from the last checkpoint")


def other_nodes(workers: dict[str, dict[str, Any]], here: str, resources: dict[str, float],
                count: int) -> list[tuple[str, str]]:
    """(address, host) of up to `count` workers on distinct hosts other than `here` that offer `resources` (Dask's
    `scheduler_info()["workers"]`), by host: the same cluster gives the same choice."""
    by_host: dict[str, str] = {}
    for address, worker in sorted(workers.items()):
        host, offered = worker.get("host") or host_of(address), worker.get("resources") or {}
        if host != here and host not in by_host and all(offered.get(k, 0.0) >= v for k, v in resources.items()):
            by_host[host] = address
    return [(by_host[host], host) for host in sorted(by_host)][:count]


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def launch_nodes(stage: str, module: str, job: dict[str, Any], nodes: int, nproc: int, resources: dict[str, float],
                 run_id: str, log: Callable[[str], None]) -> None:
    """Run `module`'s `__main__` with `job` on `nodes` hosts × `nproc` ranks: this Dask worker (node 0) and a worker
    offering `resources` on each of `nodes` − 1 other hosts; relay their output. Any node failing raises
    ChildProcessError after every agent has ended."""
    from distributed import Event, get_worker, worker_client

    try:
        here = host_of(get_worker().address)
    except ValueError:
        raise UserError(f"{stage}: training on {nodes} nodes runs as a task of a Dask worker (set dask.address)") \
            from None
    text, secrets = encode_job(job)
    # worker_client secedes this task from the worker's threads: the other nodes' agents never wait for it.
    with worker_client() as client, tempfile.TemporaryDirectory(prefix=f"nextdetail-{stage}-") as tmp:
        others = _wait_for_hosts(client, here, resources, nodes - 1)
        if len(others) < nodes - 1:
            raise ChildProcessError(f"{stage}: {nodes} nodes need Dask workers on {nodes - 1} hosts besides {here} "
                                    f"offering {resources or 'nothing more'}; {len(others)} found: the retry looks "
                                    "again")
        rendezvous = Rendezvous(nodes, f"{here}:{free_port(here)}", run_id)
        log(f"{stage}: {nodes} nodes × {nproc} processes: node 0 on {here} (this worker), "
            + ", ".join(f"node {k} on {host} ({address})" for k, (address, host) in enumerate(others, start=1)))
        client.subscribe_topic(rendezvous.log_topic, lambda event: log(str(event[1])))
        stop = Event(rendezvous.stop_event, client=client)
        futures = [client.submit(run_node, stage, module, text, secrets, nproc, rendezvous, k, workers=[address],
                                 allow_other_workers=False, resources=resources or None, pure=False,
                                 key=f"{stage}-node-{k}-{run_id}")
                   for k, (address, _) in enumerate(others, start=1)]
        failures: list[str] = []
        succeeded = False
        try:
            cmd = torchrun_command(module, write_job(tmp, text), nproc, rendezvous, here, hosts_store=True)
            log(f"{stage}: node 0: {' '.join(cmd)}")
            code = run_agent(cmd, agent_environment(secrets), log)
            succeeded = code == 0
            if not succeeded:
                failures.append(f"node 0 ({here}): torchrun exited with {code}")
        finally:
            if not succeeded:
                stop.set()  # the other agents would wait for a rendezvous that is gone
            failures += _wait_for_nodes(futures, stop, others, succeeded)
            stop.clear()  # a cleared event without waiters leaves the scheduler
            client.unsubscribe_topic(rendezvous.log_topic)
    if failures:
        raise ChildProcessError(f"{stage}: {'; '.join(failures)}; the retry resumes from the last checkpoint")


def _wait_for_hosts(client: Any, here: str, resources: dict[str, float], count: int) -> list[tuple[str, str]]:
    """The other nodes' workers (`other_nodes`), waiting a while for a host short of them (a worker restarting)."""
    deadline = time.monotonic() + HOSTS_WAIT_SECONDS
    while True:
        others = other_nodes(client.scheduler_info(n_workers=-1)["workers"], here, resources, count)
        if len(others) >= count or time.monotonic() > deadline:
            return others
        time.sleep(1.0)


def _wait_for_nodes(futures: list[Any], stop: Any, others: list[tuple[str, str]], succeeded: bool) -> list[str]:
    """Wait for the other nodes' agents (`run_node`) to end: by themselves within `AGENTS_END_SECONDS` when node 0
    `succeeded`, else (or then) by the stop event within `STOPPED_AGENTS_SECONDS`; a task still not done then is
    cancelled (it may wait for a worker that died: it was pinned to that worker). Their failures, one line each."""
    from distributed import wait

    for timeout in (AGENTS_END_SECONDS, STOPPED_AGENTS_SECONDS) if succeeded else (STOPPED_AGENTS_SECONDS,):
        try:
            wait(futures, timeout=timeout)
            break
        except TimeoutError:
            stop.set()
    failures = []
    for k, (future, (_, host)) in enumerate(zip(futures, others, strict=True), start=1):
        if not future.done():
            future.cancel()
            failures.append(f"node {k} ({host}): its agent did not end")
        elif future.status == "error":
            failures.append(f"node {k} ({host}): {type(future.exception()).__name__}: {future.exception()}")
        elif future.status != "finished":
            failures.append(f"node {k} ({host}): its task {future.status}")
    return failures


def run_node(stage: str, module: str, job_text: str, secrets: list[str], nproc: int, rendezvous: Rendezvous,
             node: int) -> int:
    """One of the other nodes of `launch_nodes`, as a task on its Dask worker: a torchrun agent joining node 0's
    rendezvous with this worker's host as its address; its output goes to node 0 (a Dask event topic). Ends its
    agent when node 0 sets the stop event. Returns `node`; raises ChildProcessError when torchrun fails."""
    from distributed import Event, get_worker

    worker = get_worker()
    host = host_of(worker.address)
    stop = Event(rendezvous.stop_event)
    tail: deque[str] = deque(maxlen=20)

    def log(line: str) -> None:
        tail.append(line)
        worker.log_event(rendezvous.log_topic, f"[node {node} {host}] {line}")

    with tempfile.TemporaryDirectory(prefix=f"nextdetail-{stage}-") as tmp:
        cmd = torchrun_command(module, write_job(tmp, job_text), nproc, rendezvous, host)
        code = run_agent(cmd, agent_environment(secrets), log, stop=stop.is_set)
    if code != 0:
        last = " | ".join(line for line in tail if line.strip())[-600:]
        raise ChildProcessError(f"torchrun exited with {code}: {last}")
    return node


def leave_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """All-reduce the gradients of `params` as one flat buffer and divide by `world` (a missing gradient
    counts as zeros, so every rank flattens the same layout)."""
    if world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    torch.distributed.all_reduce(flat)
    flat.div_(world)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
        offset += n
