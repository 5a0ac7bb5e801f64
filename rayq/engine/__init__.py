"""The in-process compression pipeline: validate, fold, score, plan, build, evaluate."""
