"""Fleet files for the `rayq zoo` tests, derived from jobs/zoo-small.yaml."""

from __future__ import annotations

import os

import pyarrow.parquet as pq
import yaml
from safetensors.torch import save_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_ZOO = os.path.join(ROOT, "jobs", "zoo-small.yaml")


def write_fleet(folder, output: str, weights: dict[str, str] | None = None,
                drop: tuple[str, ...] = (), extra: list[dict] | None = None) -> str:
    """Write the small zoo with absolute data paths, `weights` files per model name, the models
    named in `drop` left out and the entries of `extra` added; return the file's path."""
    with open(SMALL_ZOO) as handle:
        fleet = yaml.safe_load(handle)
    fleet["output"] = output
    models = []
    for entry in fleet["models"]:
        if entry["name"] in drop:
            continue
        entry["calibration"] = os.path.join(ROOT, entry["calibration"])
        if weights and entry["name"] in weights:
            entry["model_weights"] = weights[entry["name"]]
        models.append(entry)
    fleet["models"] = models + list(extra or [])
    path = os.path.join(str(folder), "fleet.yaml")
    with open(path, "w") as handle:
        yaml.safe_dump(fleet, handle)
    return path


def save_tone_weights(path: str, scale: float = 1.0) -> None:
    """Save the tone convnet's weights, with its first convolution scaled by `scale`."""
    import torch

    from rayq_zoo.tiny import tone_convnet

    model = tone_convnet()
    with torch.no_grad():
        model.conv1.weight.mul_(scale)
    save_model(model, path)


def statuses(table) -> dict[str, str]:
    return {row["name"]: row["status"] for row in table.to_pylist()}


def read_local_table(root: str):
    return pq.read_table(os.path.join(root, "fleet.parquet"))
