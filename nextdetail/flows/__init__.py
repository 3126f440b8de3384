"""Prefect flows: `runtime` sets up Prefect and Dask, one module per flow."""
