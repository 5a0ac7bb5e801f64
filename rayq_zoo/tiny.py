"""Tiny models of the three layer mixes (transformer, convolutional, recurrent) for the small zoo.

Their weights are drawn from a fixed seed, so every process builds the same model, and each takes
well under a second to score. `broken_convnet` raises in its forward and `dying_convnet` ends
the Ray worker that runs it, to show failed models in a fleet.
"""

from __future__ import annotations

import torch
from torch import nn

TEXT_VOCAB = 256  # byte values: the text calibration data is UTF-8 bytes
SIGNAL_SAMPLES = 1024  # samples per audio frame of the convolutional model
SPECTRUM_BINS = 40  # spectrum bins per frame of the recurrent model


def _seeded(module: nn.Module, seed: int) -> nn.Module:
    """Overwrite every parameter with seeded values of the default init's scale."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(module.named_parameters()):
            fan_in = parameter.shape[-1] if parameter.dim() > 1 else parameter.numel()
            values = torch.randn(parameter.shape, generator=generator) / fan_in ** 0.5
            parameter.copy_(values if "norm" not in name else 1.0 + 0.1 * values)
    return module.eval()


class ByteTextEncoder(nn.Module):
    """Byte embeddings, one transformer encoder layer, mean pooling and a projection."""

    def __init__(self, dim: int = 128):
        super().__init__()
        self.embedding = nn.Embedding(TEXT_VOCAB, dim)
        self.encoder = nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=256,
                                                  batch_first=True, dropout=0.0)
        self.projection = nn.Linear(dim, 64)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(self.embedding(input_ids))
        return self.projection(hidden.mean(dim=1))


class ToneConvNet(nn.Module):
    """Two 1-D convolutions over a frame of audio samples, then a linear head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(1, 32, kernel_size=64, stride=4)
        self.conv2 = nn.Conv1d(32, 64, kernel_size=8, stride=2)
        self.head = nn.Linear(64, 16)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.conv2(torch.relu(self.conv1(frames))))
        return self.head(hidden.mean(dim=-1))


class SpectrumLSTM(nn.Module):
    """An LSTM over spectrum frames; the last hidden state goes through a linear head."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(SPECTRUM_BINS, 128, batch_first=True)
        self.head = nn.Linear(128, 32)

    def forward(self, spectra: torch.Tensor) -> torch.Tensor:
        output, _ = self.lstm(spectra)
        return self.head(output[:, -1])


class BrokenConvNet(ToneConvNet):
    """A ToneConvNet whose forward always raises, as a model with a bug would."""

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("BrokenConvNet.forward is broken on purpose")


class DyingConvNet(ToneConvNet):
    """A ToneConvNet whose forward ends its process inside a Ray worker, as a crash would.

    In the driver it runs normally, so the first batch passes rayq's check there and the
    failure shows up only on the scoring actors, each time one is replaced.
    """

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        import os

        import ray

        # NOTE: a private attribute of Ray 2.60: the mode of the process's Ray worker.
        worker = ray._private.worker.global_worker
        if getattr(worker, "mode", None) == ray._private.worker.WORKER_MODE:
            os._exit(1)
        return super().forward(frames)


def text_encoder() -> nn.Module:
    return _seeded(ByteTextEncoder(), seed=1)


def tone_convnet() -> nn.Module:
    return _seeded(ToneConvNet(), seed=2)


def spectrum_lstm() -> nn.Module:
    return _seeded(SpectrumLSTM(), seed=3)


def broken_convnet() -> nn.Module:
    return _seeded(BrokenConvNet(), seed=2)


def dying_convnet() -> nn.Module:
    return _seeded(DyingConvNet(), seed=2)
