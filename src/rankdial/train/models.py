"""Finding and loading a base model: the embedded default or a local Hugging Face folder, always offline."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import RankdialError

DEFAULT_MODEL_NAME = "kjv-llama-tiny"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


class ModelError(RankdialError, ValueError):
    """A model folder is missing, incomplete, or not something transformers can load."""


def default_model_path() -> Path:
    """The embedded default model's folder (kjv-llama-tiny: a 4.5M-parameter Llama trained on the KJV Bible)."""
    return Path(__file__).resolve().parents[1] / "default_model"


def default_samples_path() -> Path:
    return default_model_path() / "samples"


def resolve_model(name: str | Path) -> Path:
    """The folder for `name` ("default" or a path), checked for a config, weights and a tokenizer."""
    path = default_model_path() if str(name) == "default" else Path(name).expanduser()
    if not path.exists():
        raise ModelError(f"model folder {path} does not exist; give a local Hugging Face model folder "
                         "(config.json, weights, tokenizer) or 'default' for the embedded model. rankdial never "
                         "downloads from a hub")
    if not path.is_dir():
        raise ModelError(f"model {path} is a file; give the folder that holds config.json and the weights")
    files = {p.name for p in path.iterdir()}
    missing = []
    if "config.json" not in files:
        missing.append("config.json")
    if not any(w in files for w in WEIGHT_FILES):
        missing.append("weights (model.safetensors or pytorch_model.bin)")
    if not any(t in files for t in TOKENIZER_FILES):
        missing.append("tokenizer files (tokenizer.json, tokenizer.model or vocab.*)")
    if missing:
        raise ModelError(f"model folder {path} has no {' and no '.join(missing)}; save it with "
                         "model.save_pretrained(folder) and tokenizer.save_pretrained(folder)")
    return path


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - transformers raises many kinds; report them as one
        raise ModelError(f"cannot load the tokenizer in {path}: {err}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: Path, device: torch.device | str = "cpu"):
    """(model, tokenizer) from a checked folder: a causal LM in float32 on `device`, in eval mode."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    except Exception as err:  # noqa: BLE001
        raise ModelError(f"cannot load a causal language model from {path}: {err}") from None
    return model.to(device).eval(), load_tokenizer(path)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device={name!r} but this machine has no CUDA GPU; use device=auto or cpu")
    return torch.device(name)
