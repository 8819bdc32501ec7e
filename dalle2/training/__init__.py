"""Training machinery shared by every model: the loop (`Trainer`), its checkpoints, and the
fit around it that streams a stage's shards (`fit`, `Run`)."""
