"""Fine-tuning: `train()` (LoRA, QLoRA or full) with exact resume, progress, metrics and torchrun DDP."""

from ..errors import DataError, ModelError, TrainingError, TrainingInterrupted
from ..models import default_model_path, default_samples_path, load_model, resolve_model
from .config import TrainConfig, make_config, read_config_file, read_run_config
from .data import load_dataset
from .loop import TrainResult, train

__all__ = ["TrainConfig", "make_config", "read_config_file", "read_run_config", "train", "TrainResult",
           "TrainingError", "TrainingInterrupted", "DataError", "ModelError", "load_dataset", "load_model",
           "resolve_model", "default_model_path", "default_samples_path"]
