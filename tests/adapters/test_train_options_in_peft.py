"""Each new option trains through `rankdial train` on the default model, and the folder it writes loads in PEFT
with the logits rankdial gives (LoftQ: PEFT's own LoftQ needs CUDA, so its folder is checked in rankdial only)."""

import copy

import pytest
import torch

import rankdial as rd
from rankdial.cli import main
from rankdial.models import load_model
from rankdial.train import default_model_path, default_samples_path

peft = pytest.importorskip("peft")

OPTIONS = {
    "dora": ["--use-dora"],
    "pissa": ["--init-lora-weights", "pissa"],
    "olora": ["--init-lora-weights", "olora"],
    "gaussian": ["--init-lora-weights", "gaussian"],
    "loftq": ["--method", "qlora", "--init-lora-weights", "loftq", "--loftq-config", '{"loftq_bits": 4}'],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(OPTIONS))
def test_trained_folder_loads_in_peft_with_equal_logits(name, tmp_path):
    out = tmp_path / name
    assert main(["train", "--data", str(default_samples_path() / "pydoc_qa.jsonl"), "--steps", "3",
                 "--output-dir", str(out), *OPTIONS[name]]) == 0
    base = load_model(default_model_path(), "cpu")[0].eval()
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    ours = copy.deepcopy(base)
    rd.load_adapter(ours, out)
    with torch.no_grad():
        logits = ours(input_ids=ids).logits
        assert not torch.allclose(logits, base(input_ids=ids).logits, atol=1e-3)
        if name != "loftq":
            theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
            torch.testing.assert_close(theirs(input_ids=ids).logits, logits, rtol=1e-4, atol=1e-4)
