"""One module per pipeline stage: config and data in, trained model or metrics out.

ZenML steps are thin wrappers around these; `launch` runs a training stage in the step's
process or on N torchrun processes. Metrics leave through a callback, so the library never
imports a tracker.
"""
