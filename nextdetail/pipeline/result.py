"""What a stage hands downstream, as every stage shares it: `StageResult` (each stage subclasses it beside its
declaration, `stages/<name>/__init__.py`) and a run's `PipelineResults`.

Free of torch, so an up-to-date stage's result is rebuilt from its lineage record without importing the code that
computes it; outside every stage's code identity (how a result is shown is not what it computes).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

UP_TO_DATE = "up to date"  # the work of a stage this run skipped: its lineage record named an intact artifact
NOT_NEEDED = "not needed"  # … a stage whose output this config does not use (`Stage.needed`): no artifact


@dataclass
class StageResult:
    """A stage's artifact: where it is, its identity, its summary, what this run did for it, and how it is shown —
    one summary line (`describe`, also what the flow logs), its files (`outputs`), what this run did
    (`work_line`); the CLI prints every stage with these three (`cli.print_result`)."""

    url: str
    identity: str
    summary: dict[str, Any]
    work: str = "ran"  # ran | reused | rebuilt (token cache) | up to date (this run skipped the stage)
    seconds: float = 0.0

    REPORT: ClassVar[tuple[str, str] | None] = None  # (a markdown report, its numbers per checkpoint as JSON): the
    #   files of the artifact the UI shows whole beside the stage's own summary

    @staticmethod
    def describe(summary: dict[str, Any]) -> str:
        raise NotImplementedError

    def line(self) -> str:
        return self.describe(self.summary)

    def outputs(self) -> list[tuple[str, str]]:
        """(what, where and how to read it) for each output a user looks at."""
        return [("output", self.url)]

    def next_steps(self) -> list[str]:
        """Commands worth running next on what this run built (printed under its outputs)."""
        return []

    def work_line(self) -> str:
        return f"identity: {self.identity[:16]}   {self.work} ({self.seconds:.1f}s)"

    @property
    def reused(self) -> bool:
        """Whether the stage's flow found its artifact complete instead of computing it."""
        return self.work not in ("ran", "rebuilt")

    def up_to_date(self, cfg: Any) -> StageResult:
        """This result as rebuilt from its lineage record by a run that skipped the stage (`cfg`: that run's
        config, for what records never hold, e.g. storage options)."""
        return replace(self, work=UP_TO_DATE, seconds=0.0)


class PipelineResults(dict):
    """Each stage's result by name, plus what happened to it (``work``: up to date | ran) and the run's id;
    with several models, one per branch (`branches`, by model name)."""

    def __init__(self, run_id: str) -> None:
        super().__init__()
        self.run_id = run_id
        self.work: dict[str, str] = {}
        self.identities: dict[str, str] = {}  # stage identity (the lineage record's name)
        self.run_log: str | None = None
        self.shared: dict[str, str] = {}  # stage → the branch (model) whose identical artifact this one is
        self.branches: dict[str, PipelineResults] = {}  # every branch's results by model (this one included)
