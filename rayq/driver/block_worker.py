"""The block-by-block worker: holds one block of a decoder model's weights at a time.

It runs in-process or as a Ray actor (see rayq.driver.block_backend). Each call names a block;
the worker loads that block's tensors from the checkpoint when it holds another one, scores its
share of the batches through it, and returns the QS sums with the block's outputs, which are the
next block's inputs. Every result carries the worker's peak resident memory during the call.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

import safetensors.torch
import torch
from torch.nn.utils import parametrize

from rayq.config import QuantizationSettings
from rayq.driver import memory
from rayq.model.compressed import QuantizedWeight, attach_weight
from rayq.quant.schemes import FLOAT, SCHEMES, by_compression
from rayq.scoring.batches import float_tensors
from rayq.scoring.quantized import WeightBank, quantize_weight
from rayq.scoring.sensitivity import score_batches
from rayq.sources.decoder import Block, DecoderModel
from rayq.storage.model_io import quant_config

logger = logging.getLogger(__name__)

# A block's input or output for a share of the batches: (global batch index, value) pairs. The
# embedding block takes calibration batches; later blocks take (hidden states, layer kwargs).
BlockState = list[tuple[int, Any]]


def state_bytes(state: BlockState | None) -> int:
    """Bytes of every tensor in a block's input or output, counting shared tensors once."""
    seen: dict[int, int] = {}
    for _, value in state or []:
        for tensor in _all_tensors(value):
            seen[id(tensor)] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def _all_tensors(value: Any):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _all_tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _all_tensors(item)


class BlockWorker:
    """Scores and quantizes a decoder model one block at a time; results are CPU-only values.

    TODO: blocks run on the CPU even in an actor that holds a GPU; the block's weights, its
    scoring bank and its inputs are not moved to the GPU yet.
    """

    def __init__(self, slot: int, attempt: int, folder: str, settings: dict, threads: int):
        torch.set_num_threads(max(1, threads))
        self.slot = slot
        self.attempt = attempt
        self.settings = QuantizationSettings(**settings)
        self.schemes = by_compression(self.settings.schemes)
        self.decoder = DecoderModel(folder)
        self.loaded: Block | None = None
        self.bank: WeightBank | None = None
        # Resident memory before any weight loads: the interpreter, torch,
        # transformers, Ray's worker runtime and the meta-device skeleton. Like the peaks, it
        # leaves out the object store's shared pages.
        self.baseline_rss_bytes = memory.rss_bytes() - memory.shared_rss_bytes()

    def info(self) -> dict:
        import ray

        device, device_bytes = memory.device_memory_bytes()
        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
        return {"slot": self.slot, "attempt": self.attempt, "node_id": node,
                "host": socket.gethostname(), "pid": os.getpid(), "device": device,
                "device_memory_bytes": device_bytes,
                "default_weight_cap_bytes": memory.default_weight_cap_bytes(),
                "baseline_rss_bytes": self.baseline_rss_bytes}

    def _hold(self, block: Block, with_bank: bool) -> float:
        """Hold `block`'s weights (and its scoring bank); return the seconds spent loading."""
        started = time.perf_counter()
        if self.loaded is None or self.loaded.index != block.index:
            self._drop()
            self.decoder.materialize(block)
            self.loaded = block
        if with_bank and self.bank is None:
            layers = self.decoder.block_layers(block.modules)
            self.bank = WeightBank(self.decoder.model, layers, self.schemes,
                                   self.settings.clip_search)
        return time.perf_counter() - started

    def _start_call(self, block: Block) -> None:
        """Drop a block other than `block`, then start counting this call's peak memory.

        Dropping first keeps the previous block's memory out of this call's peak.
        """
        if self.loaded is not None and self.loaded.index != block.index:
            self._drop()
        memory.reset_peak_rss()

    def _drop(self) -> None:
        self.bank = None
        if self.loaded is not None:
            self.decoder.release(self.loaded)
            self.loaded = None
        memory.trim_heap()

    def score(self, block: Block, state: BlockState) -> tuple[dict, BlockState | None]:
        """Score a share of the batches through `block`; return (report, the block's outputs)."""
        self._start_call(block)
        load_s = self._hold(block, with_bank=True)
        layers = self.decoder.block_layers(block.modules)
        largest_output = _LargestOutput(self.decoder.model, layers)
        outputs: dict[int, Any] = {}
        started = time.perf_counter()
        try:
            partials = score_batches(self.decoder.model, layers, self.schemes, self.bank, {},
                                     state, run=lambda i, s: self.decoder.run(block, i, s),
                                     outputs=outputs,
                                     per_position=self.settings.qs_normalization == "position")
        finally:
            largest_output.remove()
        next_state = None if block.kind == "head" else sorted(outputs.items())
        report = {
            "slot": self.slot, "partials": partials, "load_s": load_s,
            "score_s": time.perf_counter() - started,
            "peak_rss_bytes": memory.peak_private_bytes(),
            "baseline_rss_bytes": self.baseline_rss_bytes,
            "input_bytes": state_bytes(state), "output_bytes": state_bytes(next_state),
            # The reference output and the quantized rerun's output are alive together.
            "layer_output_bytes": 2 * largest_output.bytes,
        }
        return report, next_state

    def build(self, block: Block, schemes: dict[str, str]) -> dict:
        """Quantize `block` as planned and return its safetensors bytes and config entries.

        `schemes` maps each layer of the block to its planned scheme or float. The skeleton gets
        its float structure back afterwards, so the worker can load another block.
        """
        self.bank = None
        self._start_call(block)
        self._hold(block, with_bank=False)
        attached = self._attach(block, schemes)
        entries = quant_config(self.decoder.model, [], None)["weights"]
        tensors: dict[str, torch.Tensor] = {}
        for path in block.modules:
            module = self.decoder.model.get_submodule(path)
            for key, tensor in module.state_dict(prefix=f"{path}.").items():
                tensors[key] = tensor.contiguous()
        data = safetensors.torch.save(tensors, metadata={"format": "pt"})
        del tensors
        for owner, attribute in attached:
            parametrize.remove_parametrizations(owner, attribute, leave_parametrized=False)
        self._drop()
        return {"slot": self.slot, "data": data, "entries": entries,
                "peak_rss_bytes": memory.peak_private_bytes(),
                "baseline_rss_bytes": self.baseline_rss_bytes}

    def _attach(self, block: Block, schemes: dict[str, str]) -> list[tuple[torch.nn.Module, str]]:
        attached = []
        for layer in self.decoder.block_layers(block.modules):
            scheme = schemes.get(layer.name, FLOAT)
            if scheme == FLOAT:
                continue
            module = self.decoder.model.get_submodule(layer.name)
            for ref in layer.weights:
                owner_path, _, attribute = ref.path.rpartition(".")
                owner = module.get_submodule(owner_path) if owner_path else module
                weight = getattr(owner, attribute)
                q = quantize_weight(weight, ref.layout, SCHEMES[scheme].weights,
                                    self.settings.clip_search)
                attach_weight(owner, attribute, QuantizedWeight(scheme, ref.layout, q.shape,
                                                                q.dtype, q.codes, q.scales))
                attached.append((owner, attribute))
        return attached


class _LargestOutput:
    """Tracks the bytes of the largest float output of the given layers."""

    def __init__(self, model: torch.nn.Module, layers):
        self.bytes = 0
        self.handles = [model.get_submodule(layer.name).register_forward_hook(self._observe)
                        for layer in layers]

    def _observe(self, module, args, output) -> None:
        size = sum(t.numel() * t.element_size() for t in float_tensors(output))
        self.bytes = max(self.bytes, size)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
