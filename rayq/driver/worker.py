"""The scoring actor: loads the model once and scores the shares of batches it is given."""

from __future__ import annotations

import logging
import os
import socket

import ray
import torch

from rayq.config import QuantizationSettings
from rayq.engine.compress import InProcessBackend, prepare

logger = logging.getLogger(__name__)


class ScoringWorker:
    """Holds a prepared copy of the float model; results it returns are CPU-only plain values.

    `fault` is a testing hook: {"slot": k, "after_chunks": n} makes the first actor of slot k
    exit abruptly when its (n+1)-th chunk arrives, as a node failure would.
    """

    def __init__(self, slot: int, attempt: int, source: dict | None, module: torch.nn.Module | None,
                 settings: dict, threads: int, fault: dict | None = None):
        torch.set_num_threads(max(1, threads))
        self.slot = slot
        self.attempt = attempt
        self.fault = fault if fault and fault.get("slot") == slot and attempt == 0 else None
        self.chunks_seen = 0
        prepared = prepare(module if module is not None else self._load(source))
        if torch.cuda.is_available() and ray.get_gpu_ids():
            prepared.model.to("cuda")
        self.device = str(next(prepared.model.parameters(), torch.empty(0)).device)
        self.backend = InProcessBackend(prepared.model, prepared.layers,
                                        QuantizationSettings(**settings))
        self.layer_names = [layer.name for layer in prepared.layers]
        # Quantize every layer's weights once, while the actor starts, not inside the first pass.
        _ = self.backend.bank

    @staticmethod
    def _load(source: dict) -> torch.nn.Module:
        from rayq.sources.models import load_source

        # The driver's user named this source for this run, so importing it is what they asked.
        return load_source(source, trust_code=True).module

    def info(self) -> dict:
        return {"slot": self.slot, "attempt": self.attempt, "node_id": ray.get_runtime_context().get_node_id(),
                "host": socket.gethostname(), "pid": os.getpid(), "device": self.device,
                "layers": self.layer_names}

    def _maybe_fail(self) -> None:
        self.chunks_seen += 1
        if self.fault and self.chunks_seen > self.fault.get("after_chunks", 0):
            logger.error("fault injection: worker %d exits", self.slot)
            os._exit(1)

    def activation_stats(self, chunk):
        self._maybe_fail()
        return self.backend.activation_stats(chunk)

    def qs_sums(self, chunk, activations):
        self._maybe_fail()
        return self.backend.qs_sums(chunk, activations)

    def end_to_end_sums(self, chunk, activations, layer_names):
        self._maybe_fail()
        return self.backend.end_to_end_sums(chunk, activations, layer_names)
