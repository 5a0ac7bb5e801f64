"""The pretrained models of jobs/zoo.yaml behave as trained models do on their calibration data.

These checks show that the weights were loaded into the right architecture: CREPE finds a
speaking pitch in synthesized speech, and the speaker encoder groups partials by voice.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open

from rayq_zoo.speech import crepe_full, voice_encoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "jobs", "data")

pytestmark = pytest.mark.usefixtures("one_thread")


def load(name: str) -> tuple[torch.Tensor, dict]:
    with safe_open(os.path.join(DATA, name), "pt") as handle:
        key = next(iter(handle.keys()))
        return handle.get_tensor(key), handle.metadata() or {}


def test_crepe_finds_speaking_pitch():
    frames, _ = load("speech-crepe.safetensors")
    with torch.no_grad():
        probabilities = crepe_full()(frames[::6])
    confidence, bins = probabilities.max(dim=1)
    # CREPE's bins are 20 cents apart, bin 0 at 1997.38 cents above 10 Hz.
    hertz = 10 * 2 ** ((bins.double() * 20 + 1997.3794084376191) / 1200)
    voiced = hertz[confidence > 0.5]
    assert len(voiced) >= len(hertz) // 2, confidence
    # espeak-ng's voices speak between about 80 Hz and 300 Hz.
    assert 70 < voiced.median() < 350, voiced


def test_voice_encoder_groups_by_voice():
    mels, metadata = load("speech-mels.safetensors")
    voices = metadata["voices"].split(",")
    assert len(voices) == len(mels)
    with torch.no_grad():
        embeddings = voice_encoder()(mels)
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(len(mels)), atol=1e-5)
    similarity = embeddings @ embeddings.T
    same = torch.tensor([[a == b for b in voices] for a in voices])
    off_diagonal = ~torch.eye(len(voices), dtype=torch.bool)
    same_voice = similarity[same & off_diagonal].mean()
    other_voice = similarity[~same].mean()
    assert same_voice > other_voice + 0.05, (same_voice, other_voice)
