"""rayq: post-training quantization of PyTorch models, guided by per-layer sensitivity."""

from rayq.api import load, save
from rayq.engine.blocks import BlockResult, compress_blocks
from rayq.engine.compress import CompressResult, compress
from rayq.errors import RayqError
from rayq.finetune.job import FinetuneResult, finetune
from rayq.model.compressed import enable_training, freeze

__all__ = ["BlockResult", "CompressResult", "FinetuneResult", "RayqError", "compress",
           "compress_blocks", "enable_training", "finetune", "freeze", "load", "save"]
__version__ = "0.1.0"
