"""Write the speech calibration data of jobs/zoo.yaml from sentences spoken by espeak-ng.

Needs the espeak-ng program (Debian package espeak-ng) and the packages of
jobs/requirements-data.txt (librosa and webrtcvad for Resemblyzer's own preprocessing):
    make zoo-data
Sentences are prose from the Python documentation (`pydoc_data.topics`), spoken in several
English voices, resampled to 16 kHz. The files are committed, so running the zoo needs neither.
- speech-crepe.safetensors: `frames` (N, 1024), frames of 1024 samples with a hop of 10 ms taken
  where the speech is loud, each normalized to zero mean and unit standard deviation as
  torchcrepe does before its model.
- speech-mels.safetensors: `mels` (N, 160, 40), three 1.6 s partial utterances per sentence of 40-band mel frames
  made by Resemblyzer's `preprocess_wav` (volume normalization, silence trimming) and
  `wav_to_mel_spectrogram`, the input of its voice encoder. The metadata entry `voices` lists
  the espeak-ng voice of each partial, comma-separated.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import numpy as np
import torch
from safetensors.torch import save_file
from scipy.io import wavfile
from scipy.signal import resample_poly

from rayq.sources.data import pydoc_paragraphs

HERE = os.path.dirname(os.path.abspath(__file__))
RATE = 16_000
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-us+f3", "en-gb+f2")
SENTENCES = 24
CREPE_FRAMES_PER_SENTENCE = 8
PARTIAL_FRAMES = 160  # Resemblyzer's partial utterance: 160 frames of 10 ms
PARTIAL_STEP = 80
PARTIALS_PER_SENTENCE = 3  # keeps the committed file under 2 MB


def sentences(count: int) -> list[str]:
    """Return the first `count` sentences of 8 to 30 words from the Python documentation's prose."""
    chosen = []
    for paragraph in pydoc_paragraphs():
        for sentence in re.split(r"(?<=[.!?])\s+", paragraph):
            words = sentence.split()
            if 8 <= len(words) <= 30 and sentence[0].isupper() and "`" not in sentence:
                chosen.append(sentence)
            if len(chosen) == count:
                return chosen
    return chosen


def speak(text: str, voice: str) -> np.ndarray:
    """Synthesize `text` with espeak-ng and return float32 samples at 16 kHz."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "speech.wav")
        subprocess.run(["espeak-ng", "-v", voice, "-s", "160", "-w", path, text], check=True)
        rate, samples = wavfile.read(path)
    samples = samples.astype(np.float32) / 32768.0
    divisor = np.gcd(rate, RATE)
    return resample_poly(samples, RATE // divisor, rate // divisor).astype(np.float32)


def crepe_frames(wav: np.ndarray) -> np.ndarray:
    """Pick frames from the loud part of an utterance, normalized as torchcrepe normalizes them."""
    hop = RATE // 100
    starts = np.arange(0, len(wav) - 1024, hop)
    frames = np.stack([wav[s:s + 1024] for s in starts])
    loudness = frames.std(axis=1)
    voiced = starts[loudness > 0.25 * loudness.max()]
    picks = voiced[np.linspace(0, len(voiced) - 1, CREPE_FRAMES_PER_SENTENCE).astype(int)]
    chosen = np.stack([wav[s:s + 1024] for s in picks])
    chosen = chosen - chosen.mean(axis=1, keepdims=True)
    return chosen / np.maximum(chosen.std(axis=1, keepdims=True), 1e-10)


def partial_mels(wav: np.ndarray) -> list[np.ndarray]:
    from resemblyzer import preprocess_wav
    from resemblyzer.audio import wav_to_mel_spectrogram

    mels = wav_to_mel_spectrogram(preprocess_wav(wav, source_sr=RATE))
    if len(mels) < PARTIAL_FRAMES:
        mels = np.pad(mels, ((0, PARTIAL_FRAMES - len(mels)), (0, 0)))
    partials = [mels[s:s + PARTIAL_FRAMES]
                for s in range(0, len(mels) - PARTIAL_FRAMES + 1, PARTIAL_STEP)]
    keep = np.unique(np.linspace(0, len(partials) - 1, PARTIALS_PER_SENTENCE).astype(int))
    return [partials[i] for i in keep]


def main() -> None:
    frames, mels, voices = [], [], []
    for index, text in enumerate(sentences(SENTENCES)):
        wav = speak(text, VOICES[index % len(VOICES)])
        frames.append(crepe_frames(wav))
        partials = partial_mels(wav)
        mels.extend(partials)
        voices.extend([VOICES[index % len(VOICES)]] * len(partials))
    save_file({"frames": torch.from_numpy(np.concatenate(frames)).float()},
              os.path.join(HERE, "speech-crepe.safetensors"))
    save_file({"mels": torch.from_numpy(np.ascontiguousarray(np.stack(mels))).float()},
              os.path.join(HERE, "speech-mels.safetensors"),
              # The voice of each partial, for tests of the speaker embeddings.
              metadata={"voices": ",".join(voices)})


if __name__ == "__main__":
    main()
