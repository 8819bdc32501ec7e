"""One module per pipeline stage: config and data in, trained model or metrics out.

ZenML steps (through `dalle2.launch` for the training stages) are thin wrappers around
these; metrics leave through a callback, so the library never imports a tracker.
"""
