"""Stage logic as Prefect tasks. `stage` holds the shared mechanism; one module per stage."""
