"""Write the calibration data of jobs/zoo-small.yaml: byte text, tone frames and tone spectra.

Deterministic, so running it again gives the same files:
    .venv/bin/python jobs/data/make_small.py
- small-text.safetensors: `input_ids`, UTF-8 bytes of 80 paragraphs of Python documentation
  prose (`pydoc_data.topics`), 64 bytes each.
- small-tones.safetensors: 80 frames of 1024 samples at 16 kHz of chords of two tones with a
  decaying envelope, the shape of input that `rayq_zoo.tiny.tone_convnet` takes.
- small-spectra.safetensors: 80 sequences of 20 frames of 40 magnitude-spectrum bins of the
  same kind of chords, for `rayq_zoo.tiny.spectrum_lstm`.
"""

from __future__ import annotations

import math
import os

import torch
from safetensors.torch import save_file

from rayq.sources.data import pydoc_paragraphs

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLES = 80
RATE = 16_000
SPECTRUM_BINS = 40


def text_bytes() -> torch.Tensor:
    rows = []
    for paragraph in pydoc_paragraphs()[:SAMPLES]:
        data = paragraph.encode()[:64].ljust(64, b" ")
        rows.append(list(data))
    return torch.tensor(rows, dtype=torch.int64)


def chord(index: int, length: int) -> torch.Tensor:
    """Two tones a musical interval apart under a decaying envelope; the index sets the pitch."""
    time = torch.arange(length, dtype=torch.float64) / RATE
    base = 110.0 * 2 ** ((index % 36) / 12)
    ratio = (1.25, 1.5, 2.0)[index % 3]
    envelope = torch.exp(-time * (2 + index % 5))
    signal = torch.sin(2 * math.pi * base * time) + 0.5 * torch.sin(2 * math.pi * base * ratio * time)
    return (0.5 * envelope * signal).float()


def tone_frames() -> torch.Tensor:
    return torch.stack([chord(i, 1024) for i in range(SAMPLES)]).unsqueeze(1)


def tone_spectra() -> torch.Tensor:
    sequences = []
    for i in range(SAMPLES):
        signal = chord(i, 20 * 160 + 400)
        frames = signal.unfold(0, 400, 160)[:20] * torch.hann_window(400)
        spectrum = torch.fft.rfft(frames).abs()[:, :SPECTRUM_BINS * 2:2]
        sequences.append(torch.log1p(spectrum))
    return torch.stack(sequences)


def main() -> None:
    save_file({"input_ids": text_bytes()}, os.path.join(HERE, "small-text.safetensors"))
    save_file({"frames": tone_frames()}, os.path.join(HERE, "small-tones.safetensors"))
    save_file({"spectra": tone_spectra()}, os.path.join(HERE, "small-spectra.safetensors"))


if __name__ == "__main__":
    main()
