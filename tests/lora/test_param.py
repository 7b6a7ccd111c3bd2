"""LoRA on MoE expert parameters (lora/param.py) held to PEFT's target_parameters (ParamWrapper): same logits on
tiny Mixtral / Qwen-MoE / GPT-OSS models built from configs, files both ways, the same training step, merge."""

import copy

import pytest
import torch

from rankdial import ConfigError, LoraConfig, TargetError
from rankdial.adapters import load_adapter, save_adapter
from rankdial.adapters.io import adapter_state_dict
from rankdial.lora import inject
from rankdial.lora.param import ExpertLora

TP = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def moe_model(kind: str):
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  tie_word_embeddings=False)
    if kind == "mixtral":
        model = tf.MixtralForCausalLM(tf.MixtralConfig(**common, intermediate_size=48, num_local_experts=4,
                                                       num_experts_per_tok=2))
    elif kind == "qwen3_moe":
        model = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**common, intermediate_size=64, moe_intermediate_size=24,
                                                         num_experts=4, num_experts_per_tok=2, head_dim=8))
    else:  # gpt_oss: experts stored (E, d_in, d_out) and used as x @ W[e] (is_transposed)
        model = tf.GptOssForCausalLM(tf.GptOssConfig(**common, intermediate_size=24, num_local_experts=4,
                                                     num_experts_per_tok=2, head_dim=8, sliding_window=8,
                                                     layer_types=["sliding_attention", "full_attention"]))
    for name, p in model.named_parameters():
        if name.endswith("_bias"):
            torch.nn.init.normal_(p, std=0.02)  # GPT-OSS's expert biases start empty
    return model.eval()


def _peft(base, r=4, alpha=8, **kw):
    from peft import LoraConfig as PeftConfig, get_peft_model

    return get_peft_model(copy.deepcopy(base), PeftConfig(r=r, lora_alpha=alpha, target_modules=[],
                                                          target_parameters=TP, **kw))


def _ids(seed=1):
    return torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _ours(base, **kw):
    model = copy.deepcopy(base)
    inject(model, LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": [], "target_parameters": TP,
                                "init_lora_weights": False, **kw}))
    return model


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_same_logits_as_peft_on_the_same_weights(kind):
    from peft import set_peft_model_state_dict

    base = moe_model(kind)
    ours = _ours(base)
    peft = _peft(base)
    result = set_peft_model_state_dict(peft, adapter_state_dict(ours))
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora_" in k]
    ids = _ids()
    got, want = _logits(ours, ids), _logits(peft, ids)
    assert (got - _logits(base, ids)).abs().max() > 1e-2  # the update does something
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_new_adapter_leaves_the_output_exactly_as_the_base():
    base = moe_model("mixtral")
    ours = _ours(base, init_lora_weights=True)
    assert torch.equal(_logits(ours, _ids()), _logits(base, _ids()))
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_files_both_ways(tmp_path):
    from peft import PeftModel

    base = moe_model("mixtral")
    ours = _ours(base)
    save_adapter(ours, tmp_path / "ours")
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    ids = _ids()
    torch.testing.assert_close(_logits(theirs, ids), _logits(ours, ids), rtol=1e-5, atol=1e-5)

    peft = _peft(base, init_lora_weights=False)
    peft.save_pretrained(tmp_path / "peft")
    loaded = copy.deepcopy(base)
    config = load_adapter(loaded, tmp_path / "peft")
    assert config.target_parameters == sorted(TP)
    torch.testing.assert_close(_logits(loaded, ids), _logits(peft, ids), rtol=1e-5, atol=1e-5)


def test_one_training_step_matches_peft():
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    base = moe_model("qwen3_moe")
    ours, peft = _ours(base), _peft(base)
    set_peft_model_state_dict(peft, adapter_state_dict(ours))
    ids = _ids(3)
    for model in (ours, peft):
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    after, want = adapter_state_dict(ours), get_peft_model_state_dict(peft)
    assert after.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(after[k], want[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
def test_merge_equals_unmerged_and_peft_merge_and_unmerge_restores(kind):
    from peft import set_peft_model_state_dict

    base = moe_model(kind)
    ours = _ours(base)
    ids = _ids()
    before = _logits(ours, ids)
    wrapper = ours.model.layers[0].mlp.experts
    assert isinstance(wrapper, ExpertLora)
    original = wrapper.base_layer.gate_up_proj.detach().clone()
    for _, module in ours.named_modules():
        if isinstance(module, ExpertLora):
            module.merge()
            module.merge()  # twice is a no-op
    torch.testing.assert_close(_logits(ours, ids), before, rtol=1e-5, atol=1e-5)
    peft = _peft(base)
    set_peft_model_state_dict(peft, adapter_state_dict(ours))
    merged = peft.merge_and_unload()
    torch.testing.assert_close(wrapper.base_layer.gate_up_proj, merged.model.layers[0].mlp.experts.gate_up_proj)
    for _, module in ours.named_modules():
        if isinstance(module, ExpertLora):
            module.unmerge()
    torch.testing.assert_close(wrapper.base_layer.gate_up_proj, original, rtol=0, atol=1e-6)
    torch.testing.assert_close(_logits(ours, ids), before, rtol=1e-5, atol=1e-5)


def test_bad_target_parameters_are_one_line_errors():
    base = moe_model("mixtral")
    with pytest.raises(TargetError, match=r"\['mlp.experts.up_proj'\] matched no parameter.*experts.gate_up_proj") as err:
        inject(copy.deepcopy(base), LoraConfig(target_modules=[], target_parameters=["mlp.experts.up_proj"]))
    assert "\n" not in str(err.value)
    with pytest.raises(TargetError, match=r"not 3-D.*q_proj.weight \[32, 32\].*target_modules instead") as err:
        inject(copy.deepcopy(base), LoraConfig(target_modules=[], target_parameters=["self_attn.q_proj.weight"]))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="lora_dropout=0.1 with target_parameters"):
        inject(copy.deepcopy(base), LoraConfig(target_modules=[], target_parameters=TP, lora_dropout=0.1))
    with pytest.raises(ConfigError, match="target_parameters must be a list"):
        LoraConfig(target_parameters=[3])
    untouched = copy.deepcopy(base)
    with pytest.raises(TargetError):
        inject(untouched, LoraConfig(target_modules=["q_proj"], target_parameters=["nothing"]))
    assert not any(isinstance(m, ExpertLora) for m in untouched.modules())  # checked before anything changed


def test_model_verbs_merge_and_unload_unload_disabled_delete():
    from peft import set_peft_model_state_dict

    from rankdial.lora import delete_adapter, disabled, merge_and_unload, unload

    base = moe_model("mixtral")
    ids = _ids()
    ours = _ours(base)
    with disabled(ours):
        assert torch.equal(_logits(ours, ids), _logits(base, ids))
    peft = _peft(base)
    set_peft_model_state_dict(peft, adapter_state_dict(ours))
    want = _logits(ours, ids)
    plain = merge_and_unload(ours)
    theirs = peft.merge_and_unload()
    assert not any(isinstance(m, ExpertLora) for m in plain.modules())
    assert plain.state_dict().keys() == base.state_dict().keys()
    for (name, p), q in zip(plain.state_dict().items(), theirs.state_dict().values()):
        torch.testing.assert_close(p, q, msg=name)
    torch.testing.assert_close(_logits(plain, ids), want, rtol=1e-5, atol=1e-5)

    again = unload(_ours(base))
    assert torch.equal(_logits(again, ids), _logits(base, ids))
    deleted = _ours(base)
    delete_adapter(deleted, "default")
    assert not any(isinstance(m, ExpertLora) for m in deleted.modules())


def _moe_dir(path):
    import shutil

    import transformers as tf

    from rankdial.models import default_model_path

    path.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (default_model_path() / name).exists():
            shutil.copy(default_model_path() / name, path / name)
    torch.manual_seed(0)
    tf.MixtralForCausalLM(tf.MixtralConfig(vocab_size=4096, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                           num_experts_per_tok=2, tie_word_embeddings=True, bos_token_id=0,
                                           eos_token_id=0, pad_token_id=0)).save_pretrained(path)
    return path


@pytest.mark.slow
def test_rankdial_train_with_target_parameters_writes_a_folder_peft_loads(tmp_path):
    import transformers as tf
    from peft import PeftModel

    from conftest import qa_rows, write_jsonl
    from rankdial.train import train
    from rankdial.train.config import parse_flag_value

    assert parse_flag_value("target_parameters", "mlp.experts.gate_up_proj,mlp.experts.down_proj") == TP
    model_dir = _moe_dir(tmp_path / "moe")
    res = train(model=str(model_dir), data=str(write_jsonl(tmp_path / "d.jsonl", qa_rows(16))), steps=4, batch_size=4,
                lr=1e-2, max_length=32, target_modules=["q_proj"], target_parameters=TP,
                output_dir=str(tmp_path / "out"), progress=False, log=lambda *a: None)
    assert res.losses[-1] < res.losses[0]
    base = tf.MixtralForCausalLM.from_pretrained(model_dir).eval()
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out")
    ours = copy.deepcopy(base)
    load_adapter(ours, tmp_path / "out")
    ids = torch.randint(0, 4096, (2, 9), generator=torch.Generator().manual_seed(0))
    assert (_logits(ours, ids) - _logits(base, ids)).abs().max() > 1e-4  # trained experts changed the output
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), rtol=1e-5, atol=1e-5)


def test_the_serving_registry_refuses_an_expert_adapter_in_one_line(tmp_path):
    from rankdial.errors import AdapterFileError
    from rankdial.serve.registry import AdapterRegistry

    base = moe_model("mixtral")
    save_adapter(_ours(base), tmp_path / "moe-adapter")
    registry = AdapterRegistry(copy.deepcopy(base), tmp_path)
    with pytest.raises(AdapterFileError, match=r"'moe-adapter' refused: it adapts MoE expert parameters.*rankdial merge") as err:
        registry.load("moe-adapter")
    assert "\n" not in str(err.value)


def test_inspect_truncate_combine_refuse_an_expert_adapter_in_one_line(tmp_path):
    from rankdial.errors import AdapterFileError
    from rankdial.rank import read_factors

    save_adapter(_ours(moe_model("mixtral")), tmp_path / "a")
    with pytest.raises(AdapterFileError, match=r"adapts MoE expert parameters.*inspect, truncate and combine") as err:
        read_factors(tmp_path / "a")
    assert "\n" not in str(err.value)


def test_a_rank_pattern_on_an_expert_parameter_is_refused_not_ignored():
    with pytest.raises(ConfigError, match=r"rank_pattern/alpha_pattern match the expert parameter "
                                          r"model.layers.0.mlp.experts.down_proj") as err:
        _ours(moe_model("mixtral"), rank_pattern={"down_proj": 2})
    assert "\n" not in str(err.value)
    _ours(moe_model("mixtral"), rank_pattern={"q_proj": 2})  # a pattern for modules only is fine
