"""What a run records beside its metrics and how it is read back: the environment it ran in,
the process that ran it (ghost runs), the tracking server's check, the model card, reproduction."""
