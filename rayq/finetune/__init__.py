"""Quantization-aware fine-tuning of a finished run into a new run.

The loop itself (`loop`), the objectives (`objective`) and the checkpoint format (`checkpoints`)
know nothing of Ray; `runners` carries the loop out in the calling process or as a Ray Train
job, and `job` reads the parent run, measures fidelity before and after and writes the new run.
"""
