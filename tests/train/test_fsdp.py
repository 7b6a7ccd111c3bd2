"""sharding="fsdp": two CPU processes (gloo) with FSDP2 follow one process with the same global batch, and the
finished run is an ordinary PEFT adapter (or model) folder."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import qa_rows, write_jsonl
from rankdial.errors import ConfigError, TrainingError
from rankdial.train import train
from rankdial.train.config import make_config
from rankdial.train.distributed import decoder_layers

QUIET = {"progress": False, "log": lambda *a: None}


def torchrun(args, nproc=2, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), "-m", "rankdial.cli", "train", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def losses(folder):
    return [json.loads(l)["loss"] for l in (folder / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]


def test_unknown_sharding_names_the_choices():
    with pytest.raises(ConfigError, match=r"sharding='zero': choose one of ddp, fsdp"):
        make_config(data="x.jsonl", sharding="zero")


def test_fsdp_cpu_offload_without_cuda_is_refused_before_anything_is_written(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine can offload")
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(8))
    with pytest.raises(TrainingError, match="fsdp_cpu_offload"):
        train(data=str(data), output_dir=str(tmp_path / "o"), steps=1, sharding="fsdp", fsdp_cpu_offload=True, **QUIET)
    assert not (tmp_path / "o").exists()


def test_decoder_layers_finds_the_repeated_blocks(llama):
    assert decoder_layers(llama) == list(llama.model.layers)
    assert decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())) == []


@pytest.mark.slow
def test_fsdp_with_one_process_trains_unsharded_and_says_so(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(8))
    said = []
    r = train(data=str(data), output_dir=str(tmp_path / "o"), steps=1, batch_size=2, max_length=32,
              sharding="fsdp", progress=False, log=said.append)
    assert any("sharding=fsdp with one process: nothing to shard" in s for s in said)
    assert (r.output_dir / "adapter_model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_two_process_fsdp_matches_one_process_on_the_default_model(tmp_path, method):
    """Per-step loss within 1e-5 of one process; the result loads (PEFT / transformers) and gives its logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rankdial.models import default_model_path, load_model
    from rankdial import load_adapter

    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(40))
    single = train(method=method, data=str(data), output_dir=str(tmp_path / "one"), steps=4, lr=5e-3,
                   max_length=48, grad_accum=2, batch_size=4, **QUIET)
    proc = torchrun(["--method", method, "--data", str(data), "--steps", "4", "--lr", "5e-3", "--max-length", "48",
                     "--grad-accum", "2", "--batch-size", "2", "--no-progress", "--sharding", "fsdp",
                     "--output-dir", str(tmp_path / "two")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 decoder layers and the root loaded straight into shards over 2 processes" in proc.stdout
    assert losses(tmp_path / "two") == pytest.approx(single.losses, abs=1e-5)
    cfg = json.loads((tmp_path / "two" / "rankdial_train.json").read_text())
    assert cfg["world_size"] == 2 and cfg["sharding"] == "fsdp"
    ids = torch.tensor([[5, 17, 300, 41, 9, 12]])
    with torch.no_grad():
        if method == "full":
            a = AutoModelForCausalLM.from_pretrained(tmp_path / "one").eval()(input_ids=ids).logits
            b = AutoModelForCausalLM.from_pretrained(tmp_path / "two").eval()(input_ids=ids).logits
        else:
            b = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(default_model_path()),
                                          str(tmp_path / "two")).eval()(input_ids=ids).logits
            ours = load_model(default_model_path())[0].eval()
            load_adapter(ours, tmp_path / "one")
            a = ours(input_ids=ids).logits
    assert (a - b).abs().max().item() < 1e-4


@pytest.mark.parametrize("init_lora_weights", [True, False, "gaussian"])
def test_adapters_injected_on_meta_start_as_injected_on_the_cpu(init_lora_weights):
    """load_into_shards' adapter values (drawn without the model) equal inject's on a loaded model."""
    from rankdial import LoraConfig
    from rankdial.lora import inject
    from rankdial.lora.verbs import lora_layers
    from rankdial.models import default_model_path, load_model
    from rankdial.train.distributed import _lora_init_values, meta_model

    cfg = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=init_lora_weights)
    torch.manual_seed(3)
    cpu = load_model(default_model_path())[0]
    inject(cpu, cfg)
    torch.manual_seed(3)
    meta = meta_model(default_model_path())
    inject(meta, cfg)
    values = _lora_init_values(meta)
    layers = dict(lora_layers(cpu))
    assert len(values) == len(layers) == 28
    for (path, name), (a, b) in values.items():
        assert torch.equal(layers[path].lora_A[name].weight, a) and torch.equal(layers[path].lora_B[name].weight, b)


_SHARD_ONE = """
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {conftest!r})
from conftest import tiny_model
from rankdial import LoraConfig
from rankdial.lora import inject
from rankdial.quant import quantize_model
from rankdial.train.distributed import Dist, shard_model, whole_parameters
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1)
said = []
model = tiny_model("llama")
quantize_model(model)
inject(model, LoraConfig(r=2, target_modules="all-linear"))
ids = torch.tensor([[3, 9, 27, 81, 5]])
with torch.no_grad():
    before = model(input_ids=ids).logits
shard_model(model, Dist(0, 1, 0), torch.device("cpu"), say=said.append)
with torch.no_grad():
    after = model(input_ids=ids).logits
kinds = {{type(p).__name__ for p in model.parameters()}}
with whole_parameters(model, Dist(0, 1, 0), trainable_only=True) as values:
    whole = {{type(p).__name__ for p in model.parameters() if p.requires_grad}}
seq = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
shard_model(seq, Dist(0, 1, 0), torch.device("cpu"), say=said.append)
print(torch.equal(before, after), sorted(kinds), sorted(whole), len(values), said[0], said[1], sep="\\n")
"""


@pytest.mark.slow
def test_shard_model_keeps_the_outputs_and_wraps_the_root_of_a_model_without_layers(tmp_path):
    """shard_model (the path for a model passed in): NF4 + LoRA sharded as DTensors, outputs unchanged; a model
    without repeated decoder layers is sharded as one unit and says so."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "shard.py"
    script.write_text(_SHARD_ONE.format(conftest=os.path.dirname(os.path.dirname(__file__)), port=port))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    same, kinds, whole, n, first, second = proc.stdout.strip().splitlines()[-6:]
    assert same == "True" and kinds == "['DTensor']" and whole == "['Parameter']" and n == "28"
    assert "2 decoder layers and the root sharded over 1 processes" in first
    assert "Sequential has no repeated decoder layers to wrap; sharding the whole model as one unit" in second


@pytest.mark.slow
@pytest.mark.parametrize("method, option", [("lora", ["--use-dora"]), ("qlora", ["--use-dora"]),
                                            ("lora", ["--init-lora-weights", "olora"]),
                                            ("lora", ["--init-lora-weights", "pissa_niter_2"]),
                                            ("lora", ["--init-lora-weights", "gaussian"])])
def test_two_process_fsdp_dora_and_inits_match_one_process(tmp_path, method, option):
    """DoRA's magnitudes are the base's row norms and PiSSA/OLoRA decompose the base's weights, none of which the
    meta-device skeleton has: DoRA stopped with 'could not load [...lora_magnitude_vector...] into the sharded
    model', OLoRA trained from kaiming/zero factors on the untouched base (loss 11.59 vs 8.00 at step 2) and
    died saving ('Cannot copy out of meta tensor'), gaussian started from kaiming. They load whole, then shard."""
    from rankdial import load_adapter
    from rankdial.models import default_model_path, load_model

    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(16))
    single = train(method=method, data=str(data), output_dir=str(tmp_path / "one"), steps=2, lr=5e-3,
                   max_length=32, batch_size=4, **QUIET,
                   **({"use_dora": True} if option == ["--use-dora"] else {"init_lora_weights": option[1]}))
    proc = torchrun(["--method", method, *option, "--data", str(data), "--steps", "2", "--max-length", "32",
                     "--lr", "5e-3", "--batch-size", "2", "--no-progress", "--sharding", "fsdp",
                     "--output-dir", str(tmp_path / "two")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(tmp_path / "two") == pytest.approx(single.losses, rel=1e-5, abs=1e-5)
    ids = torch.tensor([[5, 17, 300, 41, 9, 12]])
    logits = []
    for run in ("one", "two"):
        model = load_model(default_model_path())[0].eval()
        load_adapter(model, tmp_path / run)
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits)
    # 1e-3 on logits of ~10: PiSSA/OLoRA's converted folder holds B·A − B₀·A₀ of large principal parts
    assert (logits[0] - logits[1]).abs().max().item() < 1e-3


@pytest.mark.slow
def test_two_process_fsdp_on_a_mixtral_with_target_parameters_matches_one_process(tmp_path):
    """Mixtral's files hold per-expert w1/w2/w3 that transformers converts to stacked experts while loading; the
    meta skeleton read the files' keys as they are and stopped with 'could not load [mlp.gate.weight, ...] into
    the sharded model'. Such a model loads whole, then shards; expert LoRA trains as on one process."""
    import shutil

    import transformers as tf
    from safetensors.torch import load_file

    from rankdial.models import default_model_path

    model_dir = tmp_path / "moe"
    model_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_path() / name, model_dir / name)
    torch.manual_seed(0)
    tf.MixtralForCausalLM(tf.MixtralConfig(vocab_size=4096, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                           num_experts_per_tok=2, bos_token_id=0, eos_token_id=0,
                                           pad_token_id=0)).save_pretrained(model_dir)
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(16))
    common = ["--target-modules", "q_proj", "--target-parameters", "mlp.experts.gate_up_proj,mlp.experts.down_proj"]
    single = train(model=str(model_dir), data=str(data), output_dir=str(tmp_path / "one"), steps=2, lr=1e-2,
                   max_length=32, batch_size=4, target_modules=["q_proj"],
                   target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], **QUIET)
    proc = torchrun(["--model", str(model_dir), *common, "--data", str(data), "--steps", "2", "--max-length", "32",
                     "--lr", "1e-2", "--batch-size", "2", "--no-progress", "--sharding", "fsdp",
                     "--output-dir", str(tmp_path / "two")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(tmp_path / "two") == pytest.approx(single.losses, abs=1e-5)
    a, b = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("one", "two"))
    assert a.keys() == b.keys() and any("experts" in k for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
