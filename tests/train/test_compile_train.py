"""compile = true in a run config: each decoder layer through torch.compile, the same losses and adapter as eager;
a model it cannot compile is refused in one line."""

import pytest
import torch
from safetensors.torch import load_file

from conftest import qa_rows, write_jsonl
from rankdial.errors import ConfigError
from rankdial.train import make_config, train
from rankdial.train.loop import compile_layers


def test_compile_is_off_by_default_and_must_be_a_bool():
    assert make_config(data="t.jsonl").compile is False and make_config(data="t.jsonl", compile=True).compile is True
    with pytest.raises(ConfigError, match="'compile' .* must be a bool"):
        make_config(data="t.jsonl", compile="yes")


def test_a_model_without_decoder_layers_or_a_sharded_run_is_refused():
    with pytest.raises(ConfigError, match=r"compile = true needs a model with decoder layers.*Linear"):
        compile_layers(torch.nn.Linear(2, 2), say=lambda *a: None)
    with pytest.raises(ConfigError, match="sharding"):
        compile_layers(torch.nn.Linear(2, 2), say=lambda *a: None, fsdp=True)


@pytest.mark.slow
def test_compiled_layers_train_to_the_same_losses_and_adapter(tiny_model_dir, tmp_path):
    """inductor for real: a minute or more of compiling on a small CPU."""
    data = write_jsonl(tmp_path / "train.jsonl", qa_rows(24))
    args = dict(model=str(tiny_model_dir), data=str(data), steps=3, batch_size=4, lr=5e-3, max_length=48,
                progress=False, log=lambda *a: None)
    eager = train(output_dir=str(tmp_path / "eager"), **args)
    limit = torch._dynamo.config.recompile_limit
    compiled = train(output_dir=str(tmp_path / "compiled"), compile=True, **args)
    assert torch._dynamo.config.recompile_limit == limit  # raised for the run only, not for the rest of the process
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-4)
    a = load_file(str(tmp_path / "eager" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "compiled" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()  # layer.compile() in place: the saved names have no _orig_mod
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5)


def test_warm_up_leaves_no_trace_on_the_model_or_the_rng():
    """warm_up_compiled (run before the first step with compile = true; here on an uncompiled model, the same
    calls): no gradient left behind, weights and the RNG state as they were, the model's mode restored."""
    from conftest import tiny_model
    from rankdial import LoraConfig
    from rankdial.lora import inject
    from rankdial.train.loop import warm_up_compiled

    model = tiny_model("llama")
    inject(model, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", lora_dropout=0.1))
    model.eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(7)
    rng = torch.get_rng_state()
    said = []
    warm_up_compiled(model, torch.device("cpu"), make_config(data="t.jsonl", batch_size=3, max_length=12), said.append)
    assert torch.equal(torch.get_rng_state(), rng)  # dropout drew inside the warm-up, on a forked RNG
    assert all(p.grad is None for p in model.parameters()) and not model.training
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert said and "warm-up" in said[0]


def test_overlapping_compile_runs_keep_the_raised_limit_until_the_last_one_ends():
    """Two compile runs in threads: the first to end must not lower the limit under the other, and the last puts
    the process's own back."""
    from rankdial.train import loop

    _process_recompile_limit = loop._process_recompile_limit
    own = torch._dynamo.config.recompile_limit
    try:
        first, second = _process_recompile_limit(True), _process_recompile_limit(True)
        first.__enter__()
        torch._dynamo.config.recompile_limit = own + 16  # what compile_layers does in the run
        second.__enter__()
        first.__exit__(None, None, None)
        assert torch._dynamo.config.recompile_limit == own + 16  # the second run is still compiling
        second.__exit__(None, None, None)
        assert torch._dynamo.config.recompile_limit == own
        with _process_recompile_limit(False):  # an eager run leaves it alone
            torch._dynamo.config.recompile_limit = own + 1
        assert torch._dynamo.config.recompile_limit == own + 1
    finally:  # a failed assert must not leave a holder counted for the rest of the session's tests
        loop._limit_holders[:] = [0, None]
        torch._dynamo.config.recompile_limit = own
