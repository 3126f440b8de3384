"""The pipeline's stages as objects, and what they hand on: `stage.py` (a `Stage` per stage: its declaration,
result type and flow — the table `run` walks), `results.py` (each stage's result: what downstream reads and how
the CLI shows it), `status.py` (which stages are up to date, stale or missing, without running anything).

Kept import-free: flows import `stages.results`, and every module a flow imports is part of its code identity.
"""
