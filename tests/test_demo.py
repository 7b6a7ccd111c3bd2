"""The README's main job on the embedded default model (fewer steps than `rankdial demo` runs)."""

import json

import pytest

from rankdial.demo import run_demo
from rankdial.models import default_model_path, load_model


def test_default_model_is_shipped_small_and_pretrained():
    folder = default_model_path()
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size <= 20 * 2**20
    card = (folder / "MODEL_CARD.md").read_text()
    assert "bible-kjv-text" in card and "public domain" in card
    model, tok = load_model(folder)
    import torch

    ids = tok("And God said", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    text = tok.decode(out[0])
    assert text.startswith("And God said") and len(text.split()) >= 8


@pytest.mark.slow
def test_demo_trains_compares_and_merges(tmp_path):
    lines = []
    assert run_demo(tmp_path / "demo", steps=30, log=lines.append)
    text = "\n".join(lines)
    assert "LoRA" in text and "QLoRA" in text and "same greedy answer: True" in text
    for method in ("lora", "qlora"):
        summary = json.loads((tmp_path / "demo" / method / "summary.json").read_text())
        assert summary["eval_losses"][-1][1] < summary["eval_losses"][0][1]
    assert (tmp_path / "demo" / "merged" / "model.safetensors").is_file()
