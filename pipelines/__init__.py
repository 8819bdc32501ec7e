"""ZenML pipelines (the DAG only)."""

from pipelines.unclip import unclip_pipeline

__all__ = ["unclip_pipeline"]
