"""nextdetail: staged pipeline for next-detail autoregressive image generators."""

__version__ = "0.1.0"
