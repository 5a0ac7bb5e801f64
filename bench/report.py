"""bench/RESULTS.md from the results payload: machine, commands, figures against targets, table."""

from __future__ import annotations

# Figure name -> (comparison, bound). Names ending in a model name share the base target.
TARGETS = {
    "qs_cost_ratio": ("<=", 2.5),
    "replan_fraction": ("<=", 0.01),
    "scaling_2_workers": (">=", 1.7),
    "size_ratio_error": ("<=", 0.01),
    "peak_rss_ratio": ("<=", 1.5),
    "block_cost_ratio": ("<=", 1.3),
}
# rayq's fidelity target at threshold 0.005, from the issue that asked for these benchmarks.
FIDELITY_COSINE = 0.999
FIDELITY_BYTES = 24_000_000

METHODS = """\
## How each figure is measured

- Timings are medians of the repeats (raw values in results.json, `raw_s`); every ratio comes from
  one run of this script, with torch's default thread count unless stated.
- `qs_cost_ratio_*`: one-pass QS for int8 (quantizing the weights included) over one float
  forward pass on the same calibration batches. `qs_weight_quantization_share_*` is the part of
  the QS time spent quantizing the weights (clip search), which does not grow with the data.
- `qs_extra_scheme_ratio_*`: QS time for int8 and int4 minus the time for int8 alone, in float
  passes.
- `naive_speedup_*`: the time of quantizing one layer at a time to int8 and rerunning the whole
  model over the same batches, over the one-pass QS time; the target is 0.3 x the layer count.
  `naive_rank_correlation_*` is Spearman's rank correlation between the two methods' scores.
- Synthetic model: residual blocks (LayerNorm, Linear, GELU, Linear), 2 Linear layers each, with a
  few scaled-up input columns per Linear. All-MiniLM-L6-v2 batches: `pydoc:topics`, 16
  paragraphs of at most 128 tokens each.
- `replan_fraction`: re-planning 100 thresholds from stored scores over the int8 QS time.
- `size_ratio_error`: |saved model.safetensors bytes - bytes the plan predicts| / predicted.
- `scaling_2_workers`: sensitivity-phase time on 1 Ray worker over 2 workers, one CPU each.
  `ray_overhead_s`: the 1-worker Ray run minus the in-process run (one thread) of the same job;
  `startup` is the difference outside the sensitivity phase (Ray, actors, model transfer),
  `per_batch` the sensitivity-phase difference per scored batch.
- `peak_rss_ratio`: in fresh processes that each load MiniLM and the batches, the kernel's
  peak-RSS mark is reset and the resident size taken as the baseline; then one runs the float
  pass and the other the QS (int4 and int8, weight quantization included). Each phase's figure
  is its peak minus the baseline plus the bytes of the model's tensors and the batches: what a
  GPU worker's device holds, leaving out the interpreter, its libraries and the tokenizer. The
  ratio is the QS's median over the float pass's median (3 processes each).
  `peak_rss_added_ratio` compares only what each phase added (peak minus baseline), so the
  model's own weights count in neither.
- `block_cost_ratio`: block-by-block scoring of a random-weight Llama (hidden 1024, 16 layers,
  0.89 GB in float32) under a weight cap of a quarter of its size, over whole-model scoring of
  the same folder, both in this process on one thread without the clipping search.
  `block_peak_rss_bytes`: the largest peak resident memory of a Ray worker above its own baseline
  during the 2-worker block-by-block run; its target is the cap plus that block's activations
  (`block_peak_rss_target_bytes`).
- Fidelity: see the notes under the table.
"""


def target_of(key: str, figures: dict):
    if key.startswith("naive_speedup_") and not key.startswith("naive_speedup_target"):
        return (">=", figures.get("naive_speedup_target_" + key.removeprefix("naive_speedup_")))
    if key == "block_peak_rss_bytes":
        return ("<=", figures.get("block_peak_rss_target_bytes"))
    for base, target in TARGETS.items():
        if key == base or key.startswith(base + "_"):
            return target
    return None


def _met(value: float, target) -> str:
    op, bound = target
    return "yes" if (value <= bound if op == "<=" else value >= bound) else "MISSED"


def figure_lines(figures: dict) -> list[str]:
    lines = ["| figure | value | target | met |", "|---|---|---|---|"]
    for key, value in figures.items():
        if isinstance(value, list):
            continue
        if isinstance(value, dict):
            shown = ", ".join(f"{k} {v:.3g} s" for k, v in value.items())
            lines.append(f"| {key} | {shown} | | |")
            continue
        target = target_of(key, figures)
        if target is None or target[1] is None:
            lines.append(f"| {key} | {value:.4g} | | |")
            continue
        lines.append(f"| {key} | {value:.4g} | {target[0]} {target[1]:.3g} | {_met(value, target)} |")
    return lines


def fidelity_check(rows: list[dict], method: str) -> tuple[bool, str]:
    """A rayq row against the target: cosine, size, and smaller than every peer it matches."""
    ours = next((r for r in rows if r["method"] == method), None)
    if ours is None or "error" in ours:
        return False, f"no row {method!r}"
    problems = []
    if ours["mean_cosine"] < FIDELITY_COSINE:
        problems.append(f"mean cosine {ours['mean_cosine']:.5f} < {FIDELITY_COSINE}")
    if ours["model_bytes"] > FIDELITY_BYTES:
        problems.append(f"{ours['model_bytes'] / 1e6:.1f} MB > {FIDELITY_BYTES / 1e6:.0f} MB")
    for row in rows:
        if row["method"].startswith(("rayq", "float")) or "error" in row:
            continue
        if row["mean_cosine"] > ours["mean_cosine"]:
            problems.append(f"lower mean cosine than {row['method']} ({row['mean_cosine']:.5f})")
        if row["model_bytes"] <= ours["model_bytes"]:
            problems.append(f"not smaller than {row['method']}")
    return not problems, "; ".join(problems) or "met"


def fidelity_lines(rows: list[dict]) -> list[str]:
    lines = ["| method | model MB | mean cosine | min cosine | NN agreement | retrieval top-1 |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['method']} | failed: {row['error'].replace('|', '/')} | | | | |")
            continue
        lines.append(f"| {row['method']} | {row['model_bytes'] / 1e6:.2f} | {row['mean_cosine']:.5f} "
                     f"| {row['min_cosine']:.5f} | {row['nn_agreement']:.4f} "
                     f"| {row['retrieval_top1']:.4f} |")
    lines += ["", (f"Target at 0.005: mean cosine >= {FIDELITY_COSINE} at <= "
                   f"{FIDELITY_BYTES / 1e6:.0f} MB, smaller than every peer at equal or better "
                   "fidelity.")]
    for method in ("rayq threshold 0.005", "rayq threshold 0.005, schemes int8"):
        met, detail = fidelity_check(rows, method)
        lines.append(f"- {method}: {'met' if met else 'MISSED: ' + detail}.")
    return lines


def render(payload: dict) -> str:
    machine = payload["machine"]
    figures = payload["figures"]
    status = payload["status"]
    lines = ["# rayq benchmark results", "",
             f"**Status: {status}**", "",
             (f"Machine: {machine['cpu_count']} CPUs ({machine['cpu_model']}), "
              f"{machine['platform']}, load average {machine['load_before']} before and "
              f"{machine['load_after']} after the run."),
             (f"Versions: Python {machine['python']}, torch {machine['torch']} "
              f"({machine['torch_threads']} torch threads), torchao {machine['torchao']}, "
              f"rayq {machine['rayq']} at commit {machine['commit'][:12]}."),
             f"Command: `{payload['command']}`, {payload['elapsed_s']:.0f} s in all.", "",
             "## Figures", "", *figure_lines(figures), ""]
    rows = figures.get("fidelity_minilm")
    if rows:
        lines += ["## Fidelity at size, all-MiniLM-L6-v2, held-out text", "",
                  *fidelity_lines(rows), "", payload["fidelity_notes"], ""]
    lines.append(METHODS)
    return "\n".join(lines)
