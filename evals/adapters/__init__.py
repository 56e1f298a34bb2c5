"""Adapters to the standard harnesses (lmms-eval, VLMEvalKit): thin layers over `core.MultimodalModel`, importing
their harness lazily so neither package is needed to use (or test) the rest of unidiff."""
