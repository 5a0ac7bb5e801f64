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
    """Return the request: one GPU per worker where the cluster has GPUs, else one CPU, unless set."""
    if gpus is None:
        gpus = 1.0 if cluster_gpus >= 1 else 0.0
    if cpus is None:
        cpus = 1.0
    return WorkerRequest(workers, cpus, gpus)


def check_placement(request: WorkerRequest, nodes: list[dict[str, float]]) -> None:
    """Raise ConfigError if the workers cannot all be placed on the cluster's nodes at once.

    Each node is a dict of its total resources ("CPU", "GPU"). Counts are compared in Ray's fixed
    point of 1/10000, so 10 workers of 0.1 GPU fit on one GPU. A fraction of a GPU must fit on one
    device, as Ray places it, so workers of 0.6 GPU take one device each.
    """
    if request.workers < 1:
        raise ConfigError(f"invalid workers={request.workers}: expected at least 1")
    if request.gpus > 1 and _units(request.gpus) % _units(1):
        raise ConfigError(f"invalid GPUs per worker {request.gpus:g}: Ray takes a fraction below 1 "
                          "or a whole number; set --worker-gpus to such a value")
    capacity = worker_capacity(request, nodes)
    if capacity >= request.workers:
        return
    total_cpu = sum(n.get("CPU", 0) for n in nodes)
    total_gpu = sum(n.get("GPU", 0) for n in nodes)
    raise ConfigError(
        f"cannot place {request.describe()}: the cluster has {total_cpu:g} CPUs and "
        f"{total_gpu:g} GPUs over {len(nodes)} node(s), room for {capacity} such workers. "
        "Lower the workers or the resources per worker (--workers, --worker-cpus, "
        "--worker-gpus; worker_cpus and worker_gpus in Python).")


def worker_capacity(request: WorkerRequest, nodes: list[dict[str, float]]) -> int:
    """Return how many workers of the request's size the nodes hold at once (at most `workers`
    per node when a worker takes no CPU or GPU)."""
    return sum(min(_fit_cpus(node, request), _fit_gpus(node, request)) for node in nodes)


def _units(amount: float) -> int:
    # Ray keeps resource amounts in fixed point with a precision of 0.0001.
    return round(amount * 10_000)


def _fit_cpus(node: dict[str, float], request: WorkerRequest) -> int:
    if not request.cpus:
        return request.workers
    return _units(node.get("CPU", 0)) // max(1, _units(request.cpus))


def _fit_gpus(node: dict[str, float], request: WorkerRequest) -> int:
    if not request.gpus:
        return request.workers
    if request.gpus < 1:
        devices = _units(node.get("GPU", 0)) // _units(1)
        return devices * (_units(1) // max(1, _units(request.gpus)))
    return _units(node.get("GPU", 0)) // _units(request.gpus)
