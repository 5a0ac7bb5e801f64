"""Model factories for the job files in `jobs/`, named there as `python:rayq_zoo.MODULE:FUNCTION`.

Not imported by rayq itself. It is installed with rayq, so Ray workers and job drivers on every
node of a cluster built from this repository's image can import the factories.
"""
