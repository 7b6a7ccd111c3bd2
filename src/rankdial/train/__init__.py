"""Fine-tuning: `train()` (LoRA, QLoRA or full) with exact resume, progress, metrics and torchrun DDP."""

from .config import TrainConfig, make_config, read_config_file
from .data import DataError, load_dataset
from .loop import TrainingError, TrainResult, train
from ..models import ModelError, default_model_path, default_samples_path, load_model, resolve_model

__all__ = ["TrainConfig", "make_config", "read_config_file", "train", "TrainResult", "TrainingError", "DataError",
           "ModelError", "load_dataset", "load_model", "resolve_model", "default_model_path", "default_samples_path"]
