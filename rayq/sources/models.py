"""Model sources.

- A Hugging Face model folder, loaded offline and never with remote code. A sentence-transformers
  folder (one with `modules.json` and a pooling config) becomes a module that returns the
  sentence embeddings.
- `python:package.module:function`, a factory returning an `nn.Module`, with optional safetensors
  weights. Importing runs code, so a factory named by a run read back from storage is imported
  only with `trust_code`.
- A packaged model by its Python package name, when the package ships a model folder.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rayq.errors import ModelError

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A float model, the tokenizer that goes with it (if any) and a description of its source."""

    module: nn.Module
    tokenizer: Any
    source: dict


class SentenceEmbedder(nn.Module):
    """A transformer followed by mean pooling over the attention mask and optional L2 norm."""

    def __init__(self, transformer: nn.Module, normalize: bool):
        super().__init__()
        self.transformer = transformer
        self.normalize = normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.transformer(**kwargs).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        if self.normalize:
            pooled = nn.functional.normalize(pooled, p=2, dim=-1)
        return pooled


def parse_model_spec(spec: str, weights: str | None = None) -> dict:
    """Turn a `--model` value into a source description, checking that it exists."""
    if spec.startswith("python:"):
        target = spec.removeprefix("python:")
        if target.count(":") != 1 or not all(target.split(":")):
            raise ModelError(f"invalid model {spec!r}: expected python:package.module:function")
        return {"kind": "python", "factory": target, "weights": weights}
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise ModelError(f"model folder {spec!r} has no config.json, so it is not a Hugging "
                             "Face model folder; point --model at the folder that holds config.json")
        return {"kind": "huggingface", "path": os.path.abspath(spec)}
    module_name = spec.replace("-", "_")
    if "/" not in spec and importlib.util.find_spec(module_name) is not None:
        return {"kind": "package", "package": module_name}
    raise ModelError(f"model {spec!r} not found: expected a Hugging Face model folder, "
                     "python:package.module:function, or the name of an installed package that "
                     "ships a model")


def load_source(source: dict, trust_code: bool = True) -> LoadedModel:
    """Load the float model a source describes."""
    kind = source.get("kind")
    if kind == "huggingface":
        return _load_folder(source["path"], source)
    if kind == "package":
        return _load_folder(str(package_folder(source["package"])), source)
    if kind == "python":
        if not trust_code:
            raise ModelError(f"this run's model comes from the Python factory {source['factory']!r}; "
                             "importing it runs code, so pass --trust-code (trust_code=True) if you "
                             "trust it")
        return _load_factory(source)
    raise ModelError(f"unknown model source {source!r}")


def model_folder(source: dict) -> str | None:
    """Return the Hugging Face model folder of a source, or None for a Python factory."""
    if source.get("kind") == "huggingface":
        return source["path"]
    if source.get("kind") == "package":
        return str(package_folder(source["package"]))
    return None


def load_tokenizer(path: str):
    """Load the tokenizer of a model folder; return None when the folder has none."""
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return _load_tokenizer(AutoTokenizer, path, required=False)


def package_folder(package: str) -> Path:
    module = importlib.import_module(package)
    for attribute in ("get_model_path", "model_path"):
        getter = getattr(module, attribute, None)
        if callable(getter):
            return Path(getter())
    folder = Path(module.__file__).parent / "model"
    if (folder / "config.json").is_file():
        return folder
    raise ModelError(f"package {package!r} does not ship a model folder with config.json")


def _load_folder(path: str, source: dict) -> LoadedModel:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    from rayq.sources.decoder import is_decoder_folder

    causal = is_decoder_folder(path)
    # A causal LM keeps its output head (lm_head), which is one of its largest layers.
    loader = AutoModelForCausalLM if causal else AutoModel
    try:
        transformer = loader.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the Hugging Face model in {path!r}: {exc}") from None
    tokenizer = _load_tokenizer(AutoTokenizer, path, required=not causal)
    if causal:
        # The key/value cache serves generation; calibration passes only cost memory with it.
        transformer.config.use_cache = False
    transformer.eval()
    modules = Path(path) / "modules.json"
    if modules.is_file():
        kinds = [entry.get("type", "") for entry in json.loads(modules.read_text())]
        if any(k.endswith("Pooling") for k in kinds):
            normalize = any(k.endswith("Normalize") for k in kinds)
            return LoadedModel(SentenceEmbedder(transformer, normalize).eval(), tokenizer, source)
    return LoadedModel(transformer, tokenizer, source)


def _load_tokenizer(auto_tokenizer, path: str, required: bool):
    """Load the folder's tokenizer; a causal LM folder without one (weights only) gets None."""
    try:
        return auto_tokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        if required:
            raise ModelError(f"cannot load the tokenizer of the Hugging Face model in {path!r}: "
                             f"{exc}") from None
        logger.info("no tokenizer in %s; calibration data must be token ids", path)
        return None


def _load_factory(source: dict) -> LoadedModel:
    module_name, function_name = source["factory"].split(":")
    try:
        factory = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise ModelError(f"cannot import the model factory {source['factory']!r}: {exc}") from None
    module = factory()
    if not isinstance(module, nn.Module):
        raise ModelError(f"the factory {source['factory']!r} returned {type(module).__name__}, "
                         "not a torch.nn.Module")
    if source.get("weights"):
        _load_weights(module, source["weights"])
    return LoadedModel(module.eval(), None, source)


def _load_weights(module: nn.Module, path: str) -> None:
    import safetensors.torch

    if not os.path.isfile(path):
        raise ModelError(f"model weights {path!r} not found")
    if not path.endswith(".safetensors"):
        raise ModelError(f"model weights {path!r} are not a .safetensors file; pickled "
                         "checkpoints are not loaded because unpickling runs code")
    missing, unexpected = safetensors.torch.load_model(module, path, strict=False)
    if missing or unexpected:
        raise ModelError(f"weights {path!r} do not fit the factory's model: missing "
                         f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
