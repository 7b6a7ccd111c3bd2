"""adapter_config.json and adapter_model.safetensors as rankdial writes them carry what vLLM and LoRAX read.

What each server reads (from their sources, described here rather than copied):
- vLLM's LoRA loader (vllm/lora/peft_helper.py, PEFTHelper.from_dict / validate_legal): `r`, `lora_alpha` and
  `target_modules` are required; `bias` must be "none" (unless the server enables bias), `modules_to_save`
  must be empty, `use_dora` false; `use_rslora` picks the scale alpha/sqrt(r) over alpha/r. It ignores
  `rank_pattern` / `alpha_pattern`: one scale per adapter from the top-level r and alpha. Weights are read from
  adapter_model.safetensors under `base_model.model.<module>.lora_A.weight` (r, d_in) / `.lora_B.weight` (d_out, r).
- LoRAX (server/lorax_server/adapters/lora.py, LoraConfig.load): parses the file with PEFT's
  LoraConfig.from_pretrained (so `peft_type` must be "LORA" and every key a LoraConfig field), then reads
  `base_model_name_or_path`, `r`, `target_modules`, `fan_in_fan_out`, `lora_alpha` and `use_rslora`; weights
  under the same keys, one scale alpha/r (or alpha/sqrt(r)) per adapter.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import rankdial as rd
from rankdial.models import load_model, resolve_model

pytestmark = pytest.mark.slow  # loads the default model and PEFT (~8 s on a shared CPU)


def vllm_problems(cfg: dict, tensors: dict) -> list[str]:
    problems = [f"missing {k}" for k in ("r", "lora_alpha", "target_modules") if k not in cfg]
    if not isinstance(cfg.get("r"), int) or cfg.get("r", 0) < 1:
        problems.append(f"r must be a positive int, got {cfg.get('r')!r}")
    if not isinstance(cfg.get("lora_alpha"), (int, float)):
        problems.append(f"lora_alpha must be a number, got {cfg.get('lora_alpha')!r}")
    targets = cfg.get("target_modules")
    if not (isinstance(targets, str) or (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets))):
        problems.append(f"target_modules must be a string or a list of strings, got {targets!r}")
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias must be 'none', got {cfg['bias']!r}")
    if cfg.get("modules_to_save"):
        problems.append("modules_to_save must be empty")
    if cfg.get("use_dora"):
        problems.append("use_dora must be false")
    if not isinstance(cfg.get("use_rslora", False), bool):
        problems.append("use_rslora must be a bool")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        problems.append("rank_pattern/alpha_pattern are ignored: every module is scaled by lora_alpha/r")
    return problems + weight_problems(cfg, tensors)


def weight_problems(cfg: dict, tensors: dict) -> list[str]:
    problems = []
    for key, t in tensors.items():
        if not key.startswith("base_model.model.") or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            problems.append(f"unexpected tensor {key}")
        elif key.endswith(".lora_A.weight"):
            b = tensors.get(key.replace(".lora_A.", ".lora_B."))
            if b is None or t.shape[0] != cfg.get("r") or b.shape[1] != t.shape[0]:
                problems.append(f"{key}: A {tuple(t.shape)} and B {None if b is None else tuple(b.shape)} "
                                f"do not pair at r={cfg.get('r')}")
    return problems


def lorax_problems(folder) -> list[str]:
    from peft import LoraConfig  # LoRAX parses the file with PEFT itself

    try:
        cfg = LoraConfig.from_pretrained(str(folder))
    except Exception as err:  # noqa: BLE001 - any failure is the finding
        return [f"PEFT's LoraConfig.from_pretrained refuses it: {err}"]
    kind = getattr(cfg.peft_type, "value", cfg.peft_type)
    if kind != "LORA":
        return [f"peft_type is {kind}, not LORA"]
    problems = []
    if not cfg.base_model_name_or_path:
        problems.append("base_model_name_or_path is empty")
    if not isinstance(cfg.fan_in_fan_out, bool) or cfg.fan_in_fan_out:
        problems.append("fan_in_fan_out must be false for torch.nn.Linear weights")
    for field in ("r", "target_modules", "lora_alpha", "use_rslora"):
        if getattr(cfg, field, None) is None:
            problems.append(f"missing {field}")
    return problems


@pytest.fixture(scope="module")
def base():
    return load_model(resolve_model("default"))[0]


def write_adapter(base, folder, **lora):
    model = __import__("copy").deepcopy(base)
    rd.inject(model, rd.LoraConfig(**lora), adapter="default")
    rd.save_adapter(model, folder, "default")
    return json.loads((folder / "adapter_config.json").read_text()), load_file(folder / "adapter_model.safetensors")


@pytest.mark.parametrize("lora", [dict(r=8, lora_alpha=16, target_modules="all-linear"),
                                  dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True),
                                  dict(r=2, lora_alpha=2, target_modules=["down_proj"], lora_dropout=0.1)],
                         ids=["all-linear", "rslora-qv", "mlp-only"])
def test_written_adapter_carries_every_field_vllm_and_lorax_read(base, tmp_path, lora):
    cfg, tensors = write_adapter(base, tmp_path / "a", **lora)
    assert vllm_problems(cfg, tensors) == []
    assert lorax_problems(tmp_path / "a") == []
    assert cfg["r"] == lora["r"] and cfg["lora_alpha"] == lora["lora_alpha"]
    assert cfg["use_rslora"] is lora.get("use_rslora", False)
    # the targets are spelled out as module names (neither server expands "all-linear")
    assert isinstance(cfg["target_modules"], list) and "all-linear" not in cfg["target_modules"]
    assert {k.split(".")[-3] for k in tensors} == set(cfg["target_modules"])


def test_the_checks_catch_what_the_servers_refuse(base, tmp_path):
    cfg, tensors = write_adapter(base, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj"])
    broken = {k: v for k, v in cfg.items() if k != "lora_alpha"} | {"bias": "all", "modules_to_save": ["lm_head"]}
    extra = tensors | {"base_model.model.lm_head.weight": torch.zeros(2, 2)}
    assert vllm_problems(broken, extra) == ["missing lora_alpha", "lora_alpha must be a number, got None",
                                            "bias must be 'none', got 'all'", "modules_to_save must be empty",
                                            "unexpected tensor base_model.model.lm_head.weight"]
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg | {"peft_type": "PREFIX_TUNING"}))
    with pytest.warns(UserWarning):  # PEFT warns about the LoRA keys a prefix-tuning config does not take
        assert lorax_problems(tmp_path / "a") == ["peft_type is PREFIX_TUNING, not LORA"]


def test_per_module_ranks_are_not_portable_to_vllm(base, tmp_path):
    """rank_pattern is PEFT's and rankdial's, but vLLM scales every module by the top-level alpha/r: such an
    adapter serves on rankdial and PEFT, and the README says to keep one rank per adapter for vLLM."""
    cfg, tensors = write_adapter(base, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                 rank_pattern={"v_proj": 2})
    assert "rank_pattern/alpha_pattern are ignored: every module is scaled by lora_alpha/r" in vllm_problems(cfg, tensors)
    assert lorax_problems(tmp_path / "a") == []
