"""models/loading.py: the dtype keyword each transformers version takes, and the one device choice."""

import sys
import tomllib
from pathlib import Path

import pytest
import torch

from rankdial.errors import ModelError
from rankdial.models import pick_device
from rankdial.models.loading import dtype_kwarg


@pytest.mark.parametrize("version, key", [("4.45.2", "torch_dtype"), ("4.55.4", "torch_dtype"), ("4.56.0", "dtype"),
                                          ("5.0.0.dev0", "dtype")])
def test_the_dtype_keyword_fits_the_installed_transformers(monkeypatch, version, key):
    import transformers

    monkeypatch.setattr(transformers, "__version__", version)
    assert dtype_kwarg(torch.float32) == {key: torch.float32}


def test_pick_device_is_cuda_only_when_there_is_one():
    assert pick_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ModelError, match="'gpu0' is not a device"):
        pick_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="no CUDA GPU"):
            pick_device("cuda:0")


def test_declared_floors_are_the_tested_ones():
    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]
    assert project["requires-python"].split("#")[0].strip() == ">=3.11"  # train/config.py imports tomllib
    assert sys.version_info >= (3, 11)
    assert "transformers>=4.45" in project["dependencies"]
    assert project["license"] == "Apache-2.0"  # SPDX string: no setuptools deprecation warnings


def test_quantize_on_load_takes_gpt2_conv1d_like_quantize_model(tmp_path):
    """GPT-2's Conv1D stores its weight (d_in, d_out); quantize-on-load follows quantize_model's policy and layout."""
    import shutil

    import transformers as tf
    from rankdial.models import default_model_path, load_model, load_model_nf4
    from rankdial.quant import quantize_model
    from rankdial.quant.linear import NF4Linear

    torch.manual_seed(0)
    tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=4096, n_embd=64, n_layer=2, n_head=4, n_positions=64)).save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_path() / name, tmp_path / name)
    reference, _ = load_model(tmp_path)
    report = quantize_model(reference)
    loaded, _ = load_model_nf4(tmp_path)
    assert sorted(p for p, m in loaded.named_modules() if isinstance(m, NF4Linear)) == sorted(report.layers)
    ids = torch.tensor([[1, 2, 3, 400, 5]])
    with torch.no_grad():
        assert torch.equal(reference(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_model_loads_in_threads_run_one_at_a_time(monkeypatch, tmp_path):
    """transformers' loading is not thread-safe (it patches torch's module init while it builds): models.loading
    holds its own lock, so callers in threads (the playground's jobs and panels) need none of their own."""
    import threading
    import time

    import transformers

    import rankdial.models.loading as loading
    from conftest import make_model_dir

    folder = make_model_dir(tmp_path / "m")
    inside, most, real = [0], [0], transformers.AutoModelForCausalLM.from_pretrained

    def slow_from_pretrained(*a, **k):
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        time.sleep(0.2)
        try:
            return real(*a, **k)
        finally:
            inside[0] -= 1
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", slow_from_pretrained)
    threads = [threading.Thread(target=loading.load_model, args=(folder,)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1
