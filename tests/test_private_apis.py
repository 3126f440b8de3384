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


def test_a_workers_task_runs_share_their_flows_settings_built_once():
    """`runtime._flow_context_of` hands Prefect's `hydrated_context` the flow's settings already built (a `Settings`
    where Prefect serialized a dict), so a worker builds them once per flow run, not per task run: the task run
    sees the flow's values, and the built object is taken as it is (pydantic does not rebuild a model instance)."""
    import pickle

    from prefect.context import SettingsContext, hydrated_context, serialize_context
    from prefect.settings import PREFECT_API_URL, Settings, get_current_settings, temporary_settings

    from nextdetail.pipeline.runtime import _flow_context_of

    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        pickled = pickle.dumps(serialize_context())
    expected = SettingsContext(**pickle.loads(pickled)["settings_context"]).settings  # what Prefect builds per run

    context = _flow_context_of(pickled)
    built = context["settings_context"]["settings"]
    assert isinstance(built, Settings) and built.model_dump() == expected.model_dump()
    assert _flow_context_of(pickle.dumps(pickle.loads(pickled))) is context  # the same flow context: built once
    assert SettingsContext(**context["settings_context"]).settings is built, (
        "pydantic rebuilt the Settings it was given: runtime._flow_context_of no longer saves the per-task build")
    with hydrated_context(context):
        assert get_current_settings().api.url == "http://127.0.0.1:9/api"
