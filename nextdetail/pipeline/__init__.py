"""The machinery every stage uses, written once:

- `declaration` — a stage's declaration (`Stage`) and identity (`StageKey`, `stage_key`, `key_of`);
- `code` — the code a stage computes with, derived from its flow's imports (its code identity);
- `artifacts` — the artifact/marker protocol (an artifact is complete when its marker says so);
- `tasks` — `stage_task`: a Prefect task that reuses a complete artifact or builds and publishes it;
- `parts` — `build_one` / `fan_out`: how a flow runs its tasks;
- `training`, `torchrun` — the training loop and its multi-process launcher;
- `result` — what a stage hands on (`StageResult`);
- `runtime` — Prefect and Dask (API server, clusters, task runners, logging);
- `run` — `nextdetail run`: every stage as one Prefect flow, skipping what is up to date;
- `ui` — how runs look in the Prefect UI (outside every identity).

Kept import-free: importing a submodule must not import Prefect or torch with it.
"""
