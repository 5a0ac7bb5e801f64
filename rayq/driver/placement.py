"""Can the requested workers ever be placed? A pure check on the cluster's total resources.

Ray would otherwise wait forever for an actor that no node can hold, so the driver checks the
request against what the cluster has before any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

from rayq.errors import ConfigError


@dataclass(frozen=True)
class WorkerRequest:
    """Workers to start and the resources each one takes."""

    workers: int
    cpus: float
    gpus: float

    def describe(self) -> str:
        parts = [f"{self.cpus:g} CPU"]
        if self.gpus:
            parts.append(f"{self.gpus:g} GPU")
        return f"{self.workers} workers of {' + '.join(parts)} each"


def default_request(workers: int, cluster_gpus: float, cpus: float | None, gpus: float | None) -> WorkerRequest:
    """One GPU per worker where the cluster has GPUs, one CPU otherwise, unless the job says."""
    if gpus is None:
        gpus = 1.0 if cluster_gpus >= 1 else 0.0
    if cpus is None:
        cpus = 1.0
    return WorkerRequest(workers, cpus, gpus)


def check_placement(request: WorkerRequest, nodes: list[dict[str, float]]) -> None:
    """Raise ConfigError if the workers cannot all be placed on the cluster's nodes at once.

    Each node is a dict of its total resources ("CPU", "GPU"). Workers are packed greedily;
    fractional GPUs share a device, as Ray allows.
    """
    if request.workers < 1:
        raise ConfigError(f"invalid workers={request.workers}: expected at least 1")
    capacity = 0
    for node in nodes:
        by_cpu = int(node.get("CPU", 0) // request.cpus) if request.cpus else request.workers
        by_gpu = int(node.get("GPU", 0) // request.gpus) if request.gpus else request.workers
        capacity += min(by_cpu, by_gpu)
    if capacity >= request.workers:
        return
    total_cpu = sum(n.get("CPU", 0) for n in nodes)
    total_gpu = sum(n.get("GPU", 0) for n in nodes)
    raise ConfigError(
        f"cannot place {request.describe()}: the cluster has {total_cpu:g} CPUs and "
        f"{total_gpu:g} GPUs over {len(nodes)} node(s), room for {capacity} such workers. "
        "Lower --workers or the resources per worker (--worker-cpus, --worker-gpus).")
