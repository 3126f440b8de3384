"""A `Stage` per stage: what `nextdetail run` walks.

Each one ties together the three places a stage lives, each written once:
- its declaration (`conf/stages.py:SPECS`): upstream stages, settings slice, outside inputs, output directory —
  from which its identity is computed;
- its flow (`flows/<name>.py:run_<name>`): how it plans its parts and runs them (`flows/parts.py`);
- its result type (`stages/results.py`): what it hands downstream, how a lineage record becomes one again, and
  how the CLI prints it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from nextdetail.conf.schema import STAGES, PipelineConfig
from nextdetail.conf.stages import SPECS, StageKey, StageSpec
from nextdetail.stages import results as R


@dataclass(frozen=True)
class Stage:
    name: str
    result: type[R.StageResult]
    dask: bool = False  # its tasks run on the Dask cluster (the flow takes a `scheduler`)

    @property
    def spec(self) -> StageSpec:
        return SPECS[self.name]

    def run(self, cfg: PipelineConfig, key: StageKey, upstream: Mapping[str, R.StageResult], progress: bool,
            scheduler: Callable[[], str] | None = None) -> R.StageResult:
        """The stage's flow on its upstream results, in the declaration's order (imported only now: torch comes
        with it); `scheduler()` gives the Dask scheduler of a Dask stage (None: a LocalCluster for this call)."""
        module = importlib.import_module(self.spec.flow)
        from nextdetail.flows.ui import present_stage_flow

        present_stage_flow(getattr(module, f"{self.name}_flow"), self.name)  # its runs' names and parameters
        runner = getattr(module, f"run_{self.name}")
        extra = {"scheduler": scheduler() if scheduler else None} if self.dask else {}
        used = self.spec.upstream_of(cfg)  # an upstream stage the config does not need is passed as None
        return runner(cfg, key, *[upstream[u] if u in used else None for u in self.spec.upstream], progress=progress,
                      **extra)

    def recorded(self, cfg: PipelineConfig, record: dict[str, Any]) -> R.StageResult:
        """The result a lineage record holds, as a run that skipped the stage hands it on."""
        return self.result(**record["result"]).up_to_date(cfg)


TABLE: dict[str, Stage] = {s.name: s for s in (
    Stage("shard", R.ShardResult, dask=True),
    Stage("decompose", R.DecomposeResult, dask=True),
    Stage("train_tokenizer", R.TokenizerResult),
    Stage("tokenize", R.TokensResult),
    Stage("train_ar", R.ARResult),
    Stage("sample", R.SampleResult),
    Stage("evaluate", R.EvalResult),
)}
assert tuple(TABLE) == STAGES
