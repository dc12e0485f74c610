"""``tsrec plan``: per-GPU memory of SFT/RL candidates from a backbone's HF config (no weights, no Ray)."""

from tsrec.plan.planner import Backbone, Candidate, PlanError, Setup, best, candidates, evaluate, load_backbone

__all__ = ["Backbone", "Candidate", "PlanError", "Setup", "best", "candidates", "evaluate", "load_backbone"]
