"""Second-stage parallel-decoding distillation of the backbone (`unidiff distill-backbone`): path distillation on the
model's own verified sampler trajectories, or dParallel's certainty forcing (the objective's CAP term)."""
