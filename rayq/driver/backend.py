"""`RayBackend`: the scoring passes spread over Ray actors, merged exactly on the driver.

Batches go to the object store in chunks; idle actors take the next chunk. Results carry the
global batch index, so the engine reduces them in batch order and one worker or many give the
same bits. An actor that dies is replaced and its chunk is scored again. When a slot runs out of
restarts, the run fails with an error naming the worker and the unfinished batches.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

import ray

from rayq.config import QuantizationSettings
from rayq import progress
from rayq.driver import cluster
from rayq.driver.dispatch import dispatch
from rayq.driver.placement import check_placement, default_request
from rayq.driver.worker import ScoringWorker
from rayq.errors import RunFailedError
from rayq.quant.activations import Histogram
from rayq.scoring.sensitivity import merge_partials, merge_stats

logger = logging.getLogger(__name__)


class RayBackend:
    """Scores on `workers` actors; `model_payload` is {"source": ...} or {"module": nn.Module}."""

    def __init__(self, settings: QuantizationSettings, model_payload: dict, *, workers: int,
                 worker_cpus: float | None = None, worker_gpus: float | None = None,
                 max_restarts: int = 2, chunk_batches: int = 4, fault: dict | None = None):
        self.settings = settings
        self.max_restarts = max_restarts
        self.chunk_batches = max(1, chunk_batches)
        self.fault = fault
        nodes = cluster.node_resources()
        cluster_gpus = sum(n.get("GPU", 0) for n in nodes)
        self.request = default_request(workers, cluster_gpus, worker_cpus, worker_gpus)
        check_placement(self.request, nodes)

        if model_payload.get("module") is not None:
            # One copy in the object store, shared by every actor on a node.
            model_payload = {"module": ray.put(model_payload["module"])}
        self.payload = model_payload
        self.actor_class = ray.remote(num_cpus=self.request.cpus,
                                      num_gpus=self.request.gpus)(ScoringWorker)
        self.slots: list[Any] = [self._start(slot, 0) for slot in range(workers)]
        self.restarts = [0] * workers
        self.batch_counts = [0] * workers
        self.infos = ray.get([actor.info.remote() for actor in self.slots])
        logger.info("started %s", self.request.describe())

    def _start(self, slot: int, attempt: int):
        threads = max(1, int(self.request.cpus))
        # The module's object reference is a top-level argument, so Ray resolves it in the actor.
        return self.actor_class.remote(slot, attempt, self.payload.get("source"),
                                       self.payload.get("module"), self.settings.model_dump(),
                                       threads, self.fault)

    @property
    def workers(self) -> list[dict]:
        return [{"worker_id": i, "node_id": info["node_id"], "device": info["device"],
                 "batches": self.batch_counts[i], "restarts": self.restarts[i]}
                for i, info in enumerate(self.infos)]

    def _chunks(self, batches):
        size = self.chunk_batches
        return [batches[i:i + size] for i in range(0, len(batches), size)]

    def _run(self, method: str, batches, *args, layer_groups: list[list[str]] | None = None
             ) -> tuple[list, list[int]]:
        """Run `method` on every work item; return the results and the batches each slot ran.

        A work item is a chunk of batches, or with `layer_groups` a chunk and a group of layers.
        A failed run kills the remaining actors, so their resources go back to the cluster.
        """
        chunks = [(ray.put(chunk), [i for i, _ in chunk]) for chunk in self._chunks(batches)]
        groups = layer_groups or [None]
        items = deque((ref, indices, group) for group in groups for ref, indices in chunks)
        total = len(items) and sum(len(item[1]) for item in items)
        try:
            with progress.phase(method.replace("_", " "), total) as advance:
                return self._run_items(method, items, args, advance)
        except BaseException:
            self.shutdown()
            raise

    def _run_items(self, method: str, items: deque, args: tuple, advance) -> tuple[list, list[int]]:
        results = []
        phase_counts = [0] * len(self.slots)

        def submit(actor, item):
            ref, _, group = item
            extra = (group,) if group is not None else ()
            return getattr(actor, method).remote(ref, *args, *extra), None

        def on_result(slot, item, result, _):
            results.append(result)
            phase_counts[slot] += len(item[1])
            advance(len(item[1]))

        dispatch(self.slots, items, submit, on_result,
                 replace=lambda slot, item, exc: self._replace(slot, item[1], exc),
                 describe=lambda item: f"batches {item[1]}")
        return results, phase_counts

    def _replace(self, slot: int, indices: list[int], exc: Exception) -> None:
        self.restarts[slot] += 1
        if self.restarts[slot] > self.max_restarts:
            raise RunFailedError(
                f"worker {slot} died {self.restarts[slot]} times (max_restarts={self.max_restarts}); "
                f"batches {indices} were not scored: {type(exc).__name__}")
        logger.warning("worker %d died on batches %s (%s); restarting it (restart %d of %d)",
                       slot, indices, type(exc).__name__, self.restarts[slot], self.max_restarts)
        self.slots[slot] = self._start(slot, self.restarts[slot])
        self.infos[slot] = ray.get(self.slots[slot].info.remote())

    def activation_stats(self, batches) -> dict[str, Histogram]:
        started = time.perf_counter()
        results, _ = self._run("activation_stats", batches)
        merged = merge_stats(results)
        logger.info("activation statistics on %d workers in %.1f s", len(self.slots),
                    time.perf_counter() - started)
        return merged

    def qs_sums(self, batches, activations):
        results, counts = self._run("qs_sums", batches, activations)
        # The manifest reports the batches each worker scored, so count the QS pass only: the
        # statistics pass before it may hand the same batches to other workers.
        self.batch_counts = counts
        partials = {}
        for part in results:
            partials.update(part)
        return partials

    def end_to_end_sums(self, batches, activations):
        """Spread (layer group x chunk) work items; each item is one pass per layer and scheme."""
        names = self.infos[0]["layers"]
        size = max(1, -(-len(names) // (2 * len(self.slots))))
        groups = [names[i:i + size] for i in range(0, len(names), size)]
        results, _ = self._run("end_to_end_sums", batches, activations, layer_groups=groups)
        return merge_partials(*results)

    def shutdown(self) -> None:
        for actor in self.slots:
            ray.kill(actor)
