"""Block-by-block scoring and building on Ray actors, or in the calling process.

Every block is one round: the shares of the calibration batches go to the actors, each actor
runs its share through the block and returns the QS sums and the block's outputs. The outputs
stay in Ray's object store (which spills them to local disk when it fills) and become the next
round's inputs, so hidden states never pass through the driver. An actor that dies is replaced and its
share is run again from the same stored inputs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from rayq.config import QuantizationSettings
from rayq.driver.block_worker import BlockState, BlockWorker
from rayq.driver.dispatch import dispatch
from rayq.errors import RunFailedError
from rayq.sources.decoder import Block

logger = logging.getLogger(__name__)

MMAP_THRESHOLD_BYTES = 1 << 20


class LocalBlockBackend:
    """One in-process worker; shares are plain lists."""

    def __init__(self, folder: str, settings: QuantizationSettings):
        self.worker = BlockWorker(0, 0, folder, settings.model_dump(), torch.get_num_threads())
        self.infos = [self.worker.info()]

    def put(self, state: BlockState) -> BlockState:
        return state

    def score_block(self, block: Block, shares: list) -> list[tuple[dict, Any]]:
        return [self.worker.score(block, share) for share in shares]

    def build_blocks(self, blocks: list[Block], schemes: dict[str, str],
                     write: Callable[[Block, dict], None]) -> None:
        for block in blocks:
            write(block, self.worker.build(block, schemes))

    @property
    def workers(self) -> list[dict]:
        return [{"worker_id": 0, "node_id": self.infos[0]["node_id"],
                 "device": self.infos[0]["device"], "batches": 0, "restarts": 0}]

    def shutdown(self) -> None:
        self.worker = None


class RayBlockBackend:
    """`workers` Ray actors of the BlockWorker class."""

    def __init__(self, folder: str, settings: QuantizationSettings, *, workers: int,
                 worker_cpus: float | None = None, worker_gpus: float | None = None,
                 max_restarts: int = 2):
        import ray

        from rayq.driver import cluster
        from rayq.driver.placement import check_placement, default_request

        nodes = cluster.node_resources()
        self.request = default_request(workers, sum(n.get("GPU", 0) for n in nodes),
                                       worker_cpus, worker_gpus)
        check_placement(self.request, nodes)
        self.folder = folder
        self.settings = settings
        self.max_restarts = max_restarts
        # glibc raises its mmap threshold each time a large chunk is freed, up to 32 MiB, so
        # later tensors of a few MiB come from the heap. The freed temporaries of quantization
        # leave holes there, and a worker's peak rose by up to a block's size above the live
        # tensors in the block-by-block test. A fixed threshold keeps every chunk of 1 MiB or more in its own mapping,
        # returned to the system when freed, at the cost of fresh pages for each temporary.
        env = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_BYTES)}
        self.actor_class = ray.remote(num_cpus=self.request.cpus, num_gpus=self.request.gpus,
                                      runtime_env={"env_vars": env})(BlockWorker)
        self.slots = [self._start(slot, 0) for slot in range(workers)]
        self.restarts = [0] * workers
        self.batch_counts = [0] * workers
        self.infos = ray.get([actor.info.remote() for actor in self.slots])
        logger.info("started %s for block-by-block scoring", self.request.describe())

    def _start(self, slot: int, attempt: int):
        threads = max(1, int(self.request.cpus))
        return self.actor_class.remote(slot, attempt, self.folder, self.settings.model_dump(),
                                       threads)

    def put(self, state: BlockState):
        import ray

        return ray.put(state)

    @property
    def workers(self) -> list[dict]:
        return [{"worker_id": i, "node_id": info["node_id"], "device": info["device"],
                 "batches": self.batch_counts[i], "restarts": self.restarts[i]}
                for i, info in enumerate(self.infos)]

    def score_block(self, block: Block, shares: list) -> list[tuple[dict, Any]]:
        """Run every share through `block`; return (report, output reference) per share."""
        def submit(actor, share):
            report, output = actor.score.options(num_returns=2).remote(block, share)
            return report, output

        done = self._run(list(enumerate(shares)), submit, block.describe())
        if block.index == 0:
            # Every block runs the same shares, so the first block's count is the worker's.
            for report, _ in done.values():
                self.batch_counts[report["slot"]] += len(report["partials"])
        return [done[i] for i in range(len(shares))]

    def build_blocks(self, blocks: list[Block], schemes: dict[str, str],
                     write: Callable[[Block, dict], None]) -> None:
        """Quantize the blocks on the actors and hand each result to `write` as it arrives."""
        def submit(actor, block):
            return actor.build.remote(block, schemes), None

        self._run([(block.index, block) for block in blocks], submit, "building",
                  on_done=lambda key, report: write(blocks[key], report))

    def _run(self, items: list[tuple[int, Any]], submit, what: str, on_done=None) -> dict:
        """Give each item to an idle actor; replace actors that die and run their item again."""
        done: dict[int, tuple[dict, Any]] = {}

        def on_result(slot, item, report, output_ref):
            if on_done is not None:
                on_done(item[0], report)
            else:
                done[item[0]] = (report, output_ref)

        try:
            dispatch(self.slots, items, lambda actor, item: submit(actor, item[1]), on_result,
                     replace=lambda slot, item, exc: self._replace(slot, what, exc),
                     describe=lambda item: what)
        except BaseException:
            self.shutdown()
            raise
        return done

    def _replace(self, slot: int, what: str, exc: Exception) -> None:
        import ray

        self.restarts[slot] += 1
        if self.restarts[slot] > self.max_restarts:
            raise RunFailedError(f"worker {slot} died {self.restarts[slot]} times "
                                 f"(max_restarts={self.max_restarts}) on {what}: "
                                 f"{type(exc).__name__}")
        logger.warning("worker %d died on %s (%s); restarting it (restart %d of %d)", slot, what,
                       type(exc).__name__, self.restarts[slot], self.max_restarts)
        self.slots[slot] = self._start(slot, self.restarts[slot])
        self.infos[slot] = ray.get(self.slots[slot].info.remote())

    def shutdown(self) -> None:
        import ray

        for actor in self.slots:
            ray.kill(actor)
        self.slots = []
