"""Calibration and evaluation data sources; the first dimension of every tensor indexes samples.

- `pydoc:topics`: paragraphs of English text from the Python documentation that every Python
  ships in `pydoc_data.topics`, tokenized with the model's tokenizer.
- a `.txt` file: paragraphs separated by blank lines, tokenized the same way.
- a `.parquet` file: each column is a keyword argument of the model's forward.
- a `.safetensors` file: each tensor is the keyword argument of its name; a file with a single
  tensor gives the single positional argument.
Local paths and `s3://` locations.
"""

from __future__ import annotations

import io
import os
import logging
import re
from typing import Any

import torch

from rayq.errors import DataError
from rayq.storage.location import parse_location

logger = logging.getLogger(__name__)

PYDOC = "pydoc:topics"
LENGTH_WINDOW_BATCHES = 8


def pydoc_paragraphs() -> list[str]:
    """Paragraphs of prose from `pydoc_data.topics`, in a fixed order, without code lines."""
    from pydoc_data.topics import topics

    paragraphs = []
    for key in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[key]):
            text = " ".join(line.strip() for line in block.splitlines())
            words = text.split()
            # Keep sentences of prose; skip code samples, tables and headings.
            if len(words) >= 12 and text[:1].isalpha() and not text.startswith((">>>", "...")):
                paragraphs.append(text)
    return paragraphs


def _read(uri: str) -> bytes:
    location = parse_location(uri)
    if not location.is_local:
        return location.read_bytes()
    try:
        with open(location.root, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise DataError(f"calibration data {uri!r} not found; check the path") from None


def text_paragraphs(spec: str) -> list[str]:
    if spec == PYDOC:
        return pydoc_paragraphs()
    text = _read(spec).decode("utf-8", errors="replace")
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]
    if not paragraphs:
        # The tokenizer would fail on an empty list with an IndexError.
        raise DataError(f"calibration data {spec!r} is empty: it contains no text. Give a text "
                        "file with paragraphs separated by blank lines")
    return paragraphs


def tokenize(paragraphs: list[str], tokenizer: Any, batch_size: int, max_length: int) -> list[dict]:
    if tokenizer is None:
        raise DataError("text calibration data needs a model with a tokenizer; give Parquet or "
                        "safetensors tensors for this model instead")
    # Paragraphs of similar length share a batch, so few positions are padding: padded positions
    # would add outputs that no real input produces to every layer's QS sums. Sorting happens
    # within windows of a few batches, so the last batches (held out by default) still come
    # from the end of the text.
    lengths = [len(ids) for ids in tokenizer(paragraphs, truncation=True, max_length=max_length)["input_ids"]]
    window = batch_size * LENGTH_WINDOW_BATCHES
    ordered = []
    for start in range(0, len(paragraphs), window):
        ordered += sorted(range(start, min(start + window, len(paragraphs))), key=lambda i: lengths[i])
    batches = []
    for start in range(0, len(ordered), batch_size):
        texts = [paragraphs[i] for i in ordered[start:start + batch_size]]
        encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
        batches.append({k: v for k, v in encoded.items()})
    return batches


def parquet_batches(spec: str, batch_size: int) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(_read(spec)))
    except DataError:
        raise
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise DataError(f"cannot read Parquet calibration data {spec!r}: {exc}") from None
    columns = {}
    for name in table.column_names:
        values = table.column(name).to_pylist()
        try:
            columns[name] = torch.tensor(values)
        except (TypeError, ValueError) as exc:
            raise DataError(f"column {name!r} of {spec!r} is not numeric or not rectangular: "
                            f"{exc}") from None
    return _slice_columns(columns, batch_size, spec)


def safetensors_batches(spec: str, batch_size: int) -> list[Any]:
    import safetensors.torch

    try:
        tensors = safetensors.torch.load(_read(spec))
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot read safetensors calibration data {spec!r}: {exc}") from None
    batches = _slice_columns(tensors, batch_size, spec)
    if len(tensors) == 1:
        return [next(iter(b.values())) for b in batches]
    return batches


def _slice_columns(columns: dict[str, torch.Tensor], batch_size: int, spec: str) -> list[dict]:
    if not columns:
        raise DataError(f"calibration data {spec!r} contains no column or tensor. Give one "
                        "column or tensor per argument of the model's forward")
    sizes = {name: int(t.shape[0]) if t.dim() else 0 for name, t in columns.items()}
    if len(set(sizes.values())) != 1:
        raise DataError(f"calibration data {spec!r} has columns of different lengths {sizes}; "
                        "every column needs one entry per sample")
    count = next(iter(sizes.values()))
    if count == 0:
        raise DataError(f"calibration data {spec!r} contains no sample: its columns or tensors "
                        "have length 0. Give at least one sample (a row, or an entry along the "
                        "first dimension)")
    return [{k: v[i:i + batch_size] for k, v in columns.items()} for i in range(0, count, batch_size)]


def check_spec(spec: str) -> None:
    """Reject an unsupported format or a missing local file before any heavy work starts."""
    lowered = spec.lower()
    if spec != PYDOC and not lowered.endswith((".txt", ".text", ".md", ".parquet", ".safetensors")):
        raise DataError(f"unsupported calibration data {spec!r}: use {PYDOC}, a .txt file, a "
                        ".parquet file or a .safetensors file")
    location = parse_location(spec) if spec != PYDOC else None
    if location is not None and location.is_local and not os.path.isfile(location.root):
        raise DataError(f"calibration data {spec!r} not found; check the path")


def load_batches(spec: str, tokenizer: Any = None, batch_size: int = 16, max_length: int = 128,
                 max_batches: int | None = None) -> list[Any]:
    """Read a calibration source into a list of batches."""
    lowered = spec.lower()
    if spec == PYDOC or lowered.endswith((".txt", ".text", ".md")):
        batches = tokenize(text_paragraphs(spec), tokenizer, batch_size, max_length)
    elif lowered.endswith(".parquet"):
        batches = parquet_batches(spec, batch_size)
    elif lowered.endswith(".safetensors"):
        batches = safetensors_batches(spec, batch_size)
    else:
        raise DataError(f"unsupported calibration data {spec!r}: use {PYDOC}, a .txt file, a "
                        ".parquet file or a .safetensors file")
    if max_batches is not None:
        batches = batches[:max_batches]
    if not batches:
        raise DataError(f"calibration data {spec!r} is empty")
    return batches
