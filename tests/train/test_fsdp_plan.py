"""The planner under FSDP: per-process terms, and Llama-2 70B QLoRA r=16 on two processes."""

import pytest

from rankdial.errors import ConfigError
from rankdial.memory import GB, estimate_memory


def test_one_process_or_ddp_is_the_unsharded_plan():
    base = estimate_memory("llama-7b", method="lora")
    for kw in ({"processes": 1, "sharding": "fsdp"}, {"processes": 4, "sharding": "ddp"}):
        plan = estimate_memory("llama-7b", method="lora", **kw)
        assert plan.total_bytes == base.total_bytes and plan.gathered == 0


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_fsdp_divides_the_model_state_and_adds_what_is_gathered(method):
    one = estimate_memory("llama-13b", method=method)
    two = estimate_memory("llama-13b", method=method, processes=2, sharding="fsdp")
    for term in ("weights", "adapters", "gradients", "optimizer"):
        assert getattr(two, term) == pytest.approx(getattr(one, term) / 2, abs=1)
    assert two.activations == one.activations and two.logits == one.logits  # per-process batch
    assert 0 < two.gathered < one.weights / 5  # the root (embeddings, head) and two layers
    assert two.total_bytes < one.total_bytes
    four = estimate_memory("llama-13b", method=method, processes=4, sharding="fsdp")
    assert four.total_bytes < two.total_bytes


def test_llama_70b_qlora_r16_on_two_processes_fits_a_24_gb_card():
    plan = estimate_memory("llama-70b", method="qlora", rank=16, processes=2, sharding="fsdp")
    assert plan.total_bytes < 24 * GB and 24 in plan.fits
    assert 40 * GB < estimate_memory("llama-70b", method="qlora", rank=16).total_bytes  # one process: no
    assert "per process, 2 processes" in str(plan)


def test_bad_sharding_or_processes_is_one_line():
    with pytest.raises(ConfigError, match="sharding 'zero' is unknown; give one of ddp, fsdp"):
        estimate_memory("default", sharding="zero")
    with pytest.raises(ConfigError, match="processes must be a positive integer"):
        estimate_memory("default", processes=0)
