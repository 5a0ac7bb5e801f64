"""rayq: post-training quantization of PyTorch models, guided by per-layer sensitivity."""

from rayq.api import load, save
from rayq.engine.compress import CompressResult, compress
from rayq.errors import RayqError
from rayq.finetune.job import FinetuneResult, finetune
from rayq.model.compressed import enable_training, freeze

__all__ = ["CompressResult", "FinetuneResult", "RayqError", "compress", "enable_training", "finetune",
           "freeze", "load", "save"]
__version__ = "0.1.0"
