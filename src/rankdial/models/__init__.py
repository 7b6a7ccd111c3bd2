"""Base models: the embedded default (models/default/) and local Hugging Face folders, loaded offline."""

from .loading import (ModelError, default_model_path, default_samples_path, load_model, load_model_nf4, load_tokenizer,
                      pick_device, resolve_model)

__all__ = ["ModelError", "default_model_path", "default_samples_path", "load_model", "load_model_nf4",
           "load_tokenizer", "pick_device", "resolve_model"]
