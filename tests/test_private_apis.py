"""The private Prefect APIs nextdetail still uses, each pinned here: an upgrade that removes one fails this test with
what to update, instead of failing deep in a run. The list is also in docs/architecture.md."""

from __future__ import annotations


def test_prefect_dask_internals_the_task_runner_relies_on_are_there():
    """`runtime.dask_task_runner` overrides prefect-dask's submit (pure=False) and uses two private attributes;
    this pins them to the pinned prefect-dask, failing with the reason instead of deep in a run."""
    from importlib import metadata

    from prefect_dask import DaskTaskRunner

    version = metadata.version("prefect-dask")
    runner = DaskTaskRunner()
    assert hasattr(runner, "_started") and hasattr(runner, "_optimize_futures"), (
        f"prefect-dask {version} no longer has DaskTaskRunner._started/_optimize_futures: update "
        "nextdetail/pipeline/runtime.py:dask_task_runner to its new submit()")


def test_the_ephemeral_prefect_server_class_the_runtime_starts_is_there():
    """`runtime.prefect_api` starts Prefect's own ephemeral server (`SubprocessASGIServer`: what `prefect` starts
    when no PREFECT_API_URL is set) so that the CLI knows its URL and can end it on Ctrl-C."""
    from importlib import metadata

    from prefect.server.api.server import SubprocessASGIServer

    version = metadata.version("prefect")
    assert callable(getattr(SubprocessASGIServer, "start", None)) and hasattr(SubprocessASGIServer, "api_url"), (
        f"prefect {version}: SubprocessASGIServer has no start()/api_url; update "
        "nextdetail/pipeline/runtime.py:prefect_api")
