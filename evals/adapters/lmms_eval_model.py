"""The lmms-eval model class at a fixed import path, for the `lmms_eval.models` entry point (`lmms_eval.manifest`).
Importing this module imports lmms-eval; the rest of unidiff never does."""
from evals.adapters.lmms_eval import register

UnidiffLMMS = register("unidiff")
