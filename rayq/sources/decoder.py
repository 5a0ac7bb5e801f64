"""A Hugging Face decoder model split into blocks whose weights load one block at a time.

The model is built on the meta device, so its skeleton takes no memory for weights. A block is the
token embedding, a run of consecutive decoder layers, or the final norm with the output head
(`lm_head`). `materialize` reads one block's tensors from the checkpoint into the skeleton and
`release` puts them back on the meta device, so a process holds one block's weights at a time.

Block inputs are exactly what the whole model passes: the embedding block runs the model's own
`forward` and captures the arguments of the first decoder layer (hidden states, causal mask,
rotary position embeddings), and later blocks call their decoder layers with those arguments.
The supported models are causal LMs laid out as Llama is in transformers 5.x: a base model
with `embed_tokens`, `layers`, `norm` and `rotary_emb`, and an `lm_head` beside it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from rayq.errors import ModelError
from rayq.model.layers import LayerSpec, find_layers
from rayq.quant.schemes import SCHEMES
from rayq.scoring.batches import call_model
from rayq.storage.tensors import checkpoint_index, read_tensors

logger = logging.getLogger(__name__)

BlockKind = Literal["embedding", "layers", "head"]

# Working memory while a layer is scored or quantized, in multiples of its largest weight: the
# dequantized copy that the quantized rerun uses, the sliced temporaries of quantization and
# allocator slack. An estimate: the 1 GB test model's blocks of 3 layers peaked 4 to 5 weights
# above their weights and codes, so 6 leaves about one weight of margin.
WORKING_COPIES = 6


@dataclass(frozen=True)
class Block:
    """Consecutive modules of the model that are loaded, scored and written together."""

    index: int
    kind: BlockKind
    modules: tuple[str, ...]
    weight_bytes: int
    # Estimated bytes a worker holds for this block: float weights, quantized codes of every
    # candidate scheme and the working memory of one layer.
    resident_bytes: int

    def describe(self) -> str:
        first, last = self.modules[0], self.modules[-1]
        span = first if first == last else f"{first} .. {last}"
        return f"block {self.index} ({self.kind}: {span}, {self.weight_bytes / 1e6:.1f} MB)"


def is_decoder_folder(folder: str) -> bool:
    """Return whether a model folder's config names a causal LM, which blocks can split."""
    try:
        with open(os.path.join(folder, "config.json")) as handle:
            architectures = json.load(handle).get("architectures") or []
    except (OSError, ValueError):
        return False
    return any(name.endswith("ForCausalLM") for name in architectures)


class BlockCapture(Exception):
    """Raised by the hook on the first decoder layer to stop the forward pass with its inputs."""

    def __init__(self, args: tuple, kwargs: dict):
        super().__init__("captured the first decoder layer's inputs")
        self.args = args
        self.kwargs = kwargs


class DecoderModel:
    """The meta-device skeleton of a Hugging Face causal LM folder and its checkpoint index."""

    def __init__(self, folder: str):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoConfig, AutoModelForCausalLM

        try:
            config = AutoConfig.from_pretrained(folder, local_files_only=True,
                                                trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot read the Hugging Face config in {folder!r}: {exc}") from None
        # A key/value cache only costs memory during calibration and would travel between blocks.
        config.use_cache = False
        self.tensors = checkpoint_index(folder)
        # The skeleton takes the checkpoint's float dtype, as loading the whole model does.
        dtype = next((e.dtype for e in self.tensors.values() if e.dtype.is_floating_point),
                     torch.float32)
        with torch.device("meta"):
            try:
                model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                         trust_remote_code=False)
            except ValueError as exc:
                raise ModelError(f"the model in {folder!r} is not a causal LM that transformers "
                                 f"builds: {exc}") from None
        self.folder = folder
        self.config = config
        self.model = model.eval()
        self.base_name = _base_name(model, folder)
        self.base = model.get_submodule(self.base_name)
        _check_layout(self.base, model, folder)
        if getattr(config, "tie_word_embeddings", False):
            # NOTE: a tied embedding and head would need the head's block to share the
            # embedding's quantized weight, which block-by-block building does not do yet.
            raise ModelError(f"the model in {folder!r} ties its embedding and output head "
                             "(tie_word_embeddings=true); block-by-block scoring supports "
                             "untied models only. Score it whole with rayq.compress, or give "
                             "`rayq compress` a --weight-cap-bytes above its size.")
        # The rotary tables are computed, not stored, so this small module is built for real.
        self.base.rotary_emb = type(self.base.rotary_emb)(config=config).eval()
        self.layers, self.kept = find_layers(self.model)

    @property
    def weight_bytes(self) -> int:
        return sum(entry.nbytes for entry in self.tensors.values())

    def layer_names(self) -> list[str]:
        return [f"{self.base_name}.layers.{i}" for i in range(len(self.base.layers))]

    def plan_blocks(self, cap_bytes: int, schemes: list[str]) -> list[Block]:
        """Split the model into blocks whose resident bytes fit `cap_bytes`."""
        blocks: list[Block] = []
        pending: list[str] = []
        for kind, modules in self._units():
            needed = self._resident_bytes(modules, schemes)
            if needed > cap_bytes:
                raise ModelError(
                    f"{kind} modules {', '.join(modules)} need about {needed} bytes "
                    f"({needed / 1e9:.2f} GB) on one worker, more than weight_cap_bytes="
                    f"{cap_bytes}; raise weight_cap_bytes to at least {needed}")
            if kind != "layers":
                self._close(blocks, pending, schemes)
                blocks.append(self._block(len(blocks), kind, modules, schemes))
                continue
            if pending and self._resident_bytes((*pending, *modules), schemes) > cap_bytes:
                self._close(blocks, pending, schemes)
            pending.extend(modules)
        return blocks

    def _units(self) -> list[tuple[BlockKind, tuple[str, ...]]]:
        """Return the smallest blocks: the embedding, each decoder layer, the norm with the head."""
        units: list[tuple[BlockKind, tuple[str, ...]]] = [
            ("embedding", (f"{self.base_name}.embed_tokens",))]
        units += [("layers", (name,)) for name in self.layer_names()]
        units.append(("head", (f"{self.base_name}.norm", "lm_head")))
        return units

    def smallest_cap_bytes(self, schemes: list[str]) -> int:
        """Return the smallest weight cap that fits every block of one layer or one end module."""
        return max(self._resident_bytes(modules, schemes) for _, modules in self._units())

    def _close(self, blocks: list[Block], pending: list[str], schemes: list[str]) -> None:
        if pending:
            blocks.append(self._block(len(blocks), "layers", tuple(pending), schemes))
            pending.clear()

    def _block(self, index: int, kind: BlockKind, modules: tuple[str, ...],
               schemes: list[str]) -> Block:
        weight_bytes = sum(self.tensors[name].nbytes for name in self.tensor_names(modules))
        return Block(index, kind, modules, weight_bytes, self._resident_bytes(modules, schemes))

    def _resident_bytes(self, modules: tuple[str, ...] | list[str], schemes: list[str]) -> int:
        names = self.tensor_names(modules)
        weights = sum(self.tensors[name].nbytes for name in names)
        codes = 0
        largest = 0
        for layer in self.block_layers(modules):
            module = self.model.get_submodule(layer.name)
            for ref in layer.weights:
                weight = module.get_parameter(ref.path)
                rows = ref.layout.row_count(weight.shape)
                columns = weight.numel() // max(rows, 1)
                if not isinstance(module, nn.Embedding):
                    # Scoring dequantizes only the embedding rows a batch looks up, and
                    # quantization works on slices, so a table needs no whole working copy.
                    largest = max(largest, weight.numel() * 4)
                for scheme in schemes:
                    fmt = SCHEMES[scheme].weights
                    # The scoring bank keeps the codes as stored (int4 packed two per byte) and
                    # float32 scales.
                    codes += fmt.code_bytes(rows, columns) + rows * fmt.scale_count(columns) * 4
        return weights + codes + WORKING_COPIES * largest

    def tensor_names(self, modules: tuple[str, ...] | list[str]) -> list[str]:
        """Checkpoint keys of every parameter and persistent buffer under `modules`."""
        names = []
        for path in modules:
            for key in self.model.get_submodule(path).state_dict(prefix=f"{path}.", keep_vars=True):
                if key not in self.tensors:
                    raise ModelError(f"tensor {key!r} is missing from the checkpoint in "
                                     f"{self.folder!r}")
                names.append(key)
        return names

    def block_layers(self, modules: tuple[str, ...] | list[str]) -> list[LayerSpec]:
        """Return the quantizable layers inside `modules`, in model order."""
        inside = tuple(modules)
        return [layer for layer in self.layers
                if any(layer.name == m or layer.name.startswith(m + ".") for m in inside)]

    def materialize(self, block: Block) -> None:
        """Read the block's tensors from the checkpoint into the skeleton."""
        tensors = read_tensors(self.tensors, self.tensor_names(block.modules))
        for key, tensor in tensors.items():
            _assign(self.model, key, tensor)

    def release(self, block: Block) -> None:
        """Move the block's tensors back to the meta device, freeing their memory."""
        for path in block.modules:
            self.model.get_submodule(path).to_empty(device="meta")

    def run(self, block: Block, index: int, state: Any) -> Any:
        """Run one batch through a block; return the next block's input (None after the head).

        The embedding block takes a calibration batch; the other blocks take (hidden states,
        keyword arguments of the decoder layers) as the block before returned it.
        """
        if block.kind == "embedding":
            return self._run_embedding(index, state)
        hidden, kwargs = state
        if block.kind == "layers":
            for path in block.modules:
                hidden = self.model.get_submodule(path)(hidden, **kwargs)
                if isinstance(hidden, tuple):  # decoder layers of older transformers
                    hidden = hidden[0]
            return hidden, kwargs
        hidden = self.base.norm(hidden)
        self.model.lm_head(hidden)
        return None

    def _run_embedding(self, index: int, batch: Any) -> tuple[torch.Tensor, dict]:
        def capture(module, args, kwargs):
            raise BlockCapture(args, kwargs)

        handle = self.base.layers[0].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            call_model(self.model, batch, index)
        except ModelError as exc:
            if not isinstance(exc.__cause__, BlockCapture):
                raise
            captured = exc.__cause__
        except BlockCapture as exc:
            captured = exc
        else:
            raise ModelError("the model's forward never called its first decoder layer, so "
                             "its blocks cannot be scored one at a time")
        finally:
            handle.remove()
        kwargs = dict(captured.kwargs)
        hidden = captured.args[0] if captured.args else kwargs.pop("hidden_states")
        return hidden, kwargs


def _base_name(model: nn.Module, folder: str) -> str:
    name = getattr(model, "base_model_prefix", "model")
    if not hasattr(model, name) or not hasattr(model, "lm_head"):
        raise ModelError(f"the model in {folder!r} has no base model {name!r} with an lm_head "
                         "beside it; block-by-block scoring supports Llama-style causal LMs")
    return name


def _check_layout(base: nn.Module, model: nn.Module, folder: str) -> None:
    missing = [name for name in ("embed_tokens", "layers", "norm", "rotary_emb")
               if not hasattr(base, name)]
    if missing or not isinstance(getattr(base, "layers", None), nn.ModuleList):
        raise ModelError(f"the model in {folder!r} ({type(model).__name__}) lacks "
                         f"{', '.join(missing) or 'a ModuleList of layers'}; block-by-block "
                         "scoring supports Llama-style causal LMs")


def _assign(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    owner_path, _, leaf = key.rpartition(".")
    owner = model.get_submodule(owner_path)
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[leaf] = tensor

