"""How many fleet models run at once: a pure function of their worker requests and the nodes."""

from __future__ import annotations

from rayq.driver.placement import WorkerRequest, worker_capacity


def models_at_once(requests: list[WorkerRequest], nodes: list[dict[str, float]]) -> int:
    """Return how many models can have all their workers placed at the same time (at least 1).

    Sized for the most demanding model, so any mix of the fleet's models fits. Each model also
    holds its float model and its held-out outputs in the driver's memory, which this count
    does not check.
    """
    if not requests:
        return 1
    largest = max(requests, key=lambda r: (r.workers * max(r.gpus, 0), r.workers * r.cpus))
    # Asking for every model's workers at once counts the slots up to what the fleet could use.
    everything = WorkerRequest(largest.workers * len(requests), largest.cpus, largest.gpus)
    slots = worker_capacity(everything, nodes)
    return max(1, min(len(requests), slots // largest.workers))
