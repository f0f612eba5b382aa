"""Experiments built from runs: the main job, the sweep and the sequence, each a list of
"train unless finished, evaluate unless evaluated" steps."""
