"""Fidelity at size on all-MiniLM-L6-v2: rayq against torchao and torch.ao, on held-out text.

The held-out text is the last paragraphs of `pydoc:topics`, which the calibration batches (the
first paragraphs) never include. Each compressor gets the same float model and the same text.

- Cosine: between each paragraph's embedding under the compressed model and under the float one.
- Nearest-neighbour agreement: each held-out paragraph is split into halves; the first half is a
  query and the second halves form the corpus. Agreement is the fraction of queries whose nearest
  corpus entry (by cosine) is the same under the compressed model as under the float model.
- Model bytes: rayq's saved model.safetensors; for the float model and the peers, the bytes of
  `torch.save(model.state_dict())` written to memory (packed and subclass tensors included).
"""

from __future__ import annotations

import copy
import io
import logging
import os
import tempfile
import traceback

import torch
from torch import nn

import rayq
from rayq.sources.data import pydoc_paragraphs

logger = logging.getLogger(__name__)

RAYQ_THRESHOLDS = (0.001, 0.005, 0.02)
# The position-normalized QS is compared at this threshold when this rayq has the setting.
NORMALIZATION_THRESHOLD = 0.005
MAX_LENGTH = 128


def held_out_paragraphs(calibration_paragraphs: int, count: int) -> list[str]:
    """Return the last `count` pydoc paragraphs, checking that the calibration data has none."""
    paragraphs = pydoc_paragraphs()
    if len(paragraphs) - count < calibration_paragraphs:
        raise ValueError(f"{count} held-out paragraphs overlap the {calibration_paragraphs} "
                         f"calibration paragraphs of {len(paragraphs)}")
    return paragraphs[-count:]


def halves(paragraphs: list[str]) -> tuple[list[str], list[str]]:
    queries, corpus = [], []
    for text in paragraphs:
        words = text.split()
        middle = len(words) // 2
        queries.append(" ".join(words[:middle]))
        corpus.append(" ".join(words[middle:]))
    return queries, corpus


def embed(model: nn.Module, tokenizer, texts: list[str], batch_size: int = 32) -> torch.Tensor:
    rows = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            encoded = tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                                max_length=MAX_LENGTH, return_tensors="pt")
            rows.append(model(**dict(encoded)).float())
    return nn.functional.normalize(torch.cat(rows), dim=-1)


class Texts:
    """Held-out paragraphs and the float model's embeddings of them, computed once."""

    def __init__(self, float_model: nn.Module, tokenizer, paragraphs: list[str]):
        self.tokenizer = tokenizer
        self.paragraphs = paragraphs
        self.queries, self.corpus = halves(paragraphs)
        self.reference = self.embeddings(float_model)
        self.reference_neighbours = self.neighbours(*self.reference[1:])

    def embeddings(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (embed(model, self.tokenizer, self.paragraphs),
                embed(model, self.tokenizer, self.queries),
                embed(model, self.tokenizer, self.corpus))

    @staticmethod
    def neighbours(queries: torch.Tensor, corpus: torch.Tensor) -> torch.Tensor:
        return (queries @ corpus.T).argmax(dim=1)

    def score(self, model: nn.Module) -> dict:
        whole, queries, corpus = self.embeddings(model)
        cosine = (whole * self.reference[0]).sum(dim=1)
        found = self.neighbours(queries, corpus)
        own = torch.arange(len(found))
        return {"mean_cosine": float(cosine.mean()), "min_cosine": float(cosine.min()),
                "nn_agreement": float((found == self.reference_neighbours).float().mean()),
                "retrieval_top1": float((found == own).float().mean())}


def state_dict_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def _failure(exc: BaseException) -> str:
    line = traceback.format_exception_only(type(exc), exc)[-1].strip()
    return line[:300]


def rayq_rows(float_model, calibration, texts: Texts, folder: str) -> list[dict]:
    """rayq at each threshold (one scoring run, re-planned) and, if available, per-position QS."""
    rows = []
    result = rayq.compress(float_model, calibration, schemes=["int4", "int8"],
                           threshold=RAYQ_THRESHOLDS[0])
    for threshold in RAYQ_THRESHOLDS:
        planned = result if threshold == result.threshold else result.replan(threshold)
        rows.append(_rayq_row(f"rayq threshold {threshold:g}", planned, texts, folder))
    # The demo's setting: int8 as the only candidate, re-planned from the same scores.
    int8_only = result.replan(NORMALIZATION_THRESHOLD, schemes=["int8"])
    rows.append(_rayq_row(f"rayq threshold {NORMALIZATION_THRESHOLD:g}, schemes int8", int8_only,
                          texts, folder))
    rows.append(position_normalized_row(float_model, calibration, texts, folder))
    return rows


def position_normalized_row(float_model, calibration, texts: Texts, folder: str) -> dict:
    """Score rayq with `qs_normalization="position"` (each output position counts once)."""
    name = f"rayq threshold {NORMALIZATION_THRESHOLD:g}, qs_normalization=position"
    result = rayq.compress(float_model, calibration, schemes=["int4", "int8"],
                           threshold=NORMALIZATION_THRESHOLD, qs_normalization="position")
    return _rayq_row(name, result, texts, folder)


def _rayq_row(name: str, result, texts: Texts, folder: str) -> dict:
    location = os.path.join(folder, name.replace(" ", "_").replace(",", "").replace("=", "-"))
    rayq.save(result, location, overwrite=True)
    size = os.path.getsize(os.path.join(location, "model", "model.safetensors"))
    return {"method": name, "model_bytes": size, "bytes_measure": "saved model.safetensors",
            **texts.score(result.model)}


def _torchao(config_name: str, **kwargs):
    def build(model: nn.Module) -> nn.Module:
        import torchao.quantization as tq

        tq.quantize_(model, getattr(tq, config_name)(**kwargs))
        return model
    return build


def _torch_ao_dynamic(per_channel: bool):
    def build(model: nn.Module) -> nn.Module:
        from torch.ao.quantization import (
            default_dynamic_qconfig,
            per_channel_dynamic_qconfig,
            quantize_dynamic,
        )

        qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
        return quantize_dynamic(model, {nn.Linear: qconfig}, dtype=torch.qint8)
    return build


PEERS = {
    "torchao Int8WeightOnlyConfig": _torchao("Int8WeightOnlyConfig"),
    "torchao Int4WeightOnlyConfig (group 128)": _torchao("Int4WeightOnlyConfig", group_size=128),
    "torchao Int4WeightOnlyConfig (group 128, plain_int32 packing)": _torchao(
        "Int4WeightOnlyConfig", group_size=128, int4_packing_format="plain_int32"),
    "torch.ao quantize_dynamic int8, per-tensor weights": _torch_ao_dynamic(False),
    "torch.ao quantize_dynamic int8, per-channel weights": _torch_ao_dynamic(True),
}


def peer_row(name: str, build, float_model: nn.Module, texts: Texts) -> dict:
    """Score one peer. A peer that fails to build or run gets its error message as the row."""
    try:
        model = build(copy.deepcopy(float_model)).eval()
        row = {"method": name, "model_bytes": state_dict_bytes(model),
               "bytes_measure": "torch.save(state_dict)"}
        row.update(texts.score(model))
    except Exception as exc:  # noqa: BLE001 - a peer's failure is a result to report
        logger.warning("%s failed: %s", name, _failure(exc))
        return {"method": name, "error": _failure(exc)}
    return row


def fidelity_table(float_model, tokenizer, calibration, calibration_paragraphs: int,
                   held_out: int) -> list[dict]:
    texts = Texts(float_model, tokenizer, held_out_paragraphs(calibration_paragraphs, held_out))
    rows = [{"method": "float32", "model_bytes": state_dict_bytes(float_model),
             "bytes_measure": "torch.save(state_dict)", **texts.score(float_model)}]
    with tempfile.TemporaryDirectory() as folder:
        rows += rayq_rows(float_model, calibration, texts, folder)
    for name, build in PEERS.items():
        rows.append(peer_row(name, build, float_model, texts))
    return rows
