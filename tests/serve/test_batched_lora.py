"""Heterogeneous batching held to the per-request reference loop over mixes of adapter popularity."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankdial as rd
from rankdial.serve import clear_route, reference_rows, route
from conftest import model_output, tiny_model, token_batch

D_IN, D_OUT = 23, 37  # odd, so no shape lines up by accident


def layer_model(ranks: dict[str, int], seed: int, bias: bool = True) -> nn.Sequential:
    """One LoraLayer (odd shapes) holding the named adapters with non-zero A and B, in eval mode."""
    torch.manual_seed(seed)
    layer = rd.LoraLayer(nn.Linear(D_IN, D_OUT, bias=bias))
    for k, (name, r) in enumerate(ranks.items()):
        layer.add_adapter(name, r=r, alpha=2.0 * r + k, init_lora_weights=False)
    return nn.Sequential(layer).eval()


def routed_vs_reference(model: nn.Sequential, rows: list[str | None], seed: int, tokens: int = 5) -> float:
    """max |routed forward - per-row reference| for a random (rows, tokens, d_in) batch."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(rows), tokens, D_IN, generator=g) * 1.7 + 0.3
    with torch.no_grad():
        route(model, rows)
        fast = model(x)
        clear_route(model)
        ref = reference_rows(model[0], x, rows)
    assert ref.abs().max() > 0.1 and fast.shape == ref.shape == (len(rows), tokens, D_OUT)
    return (fast - ref).abs().max().item()


NAMES = [f"ad{i}" for i in range(9)]
MIXES = {
    "all_same": ["ad3"] * 7,
    "all_distinct": NAMES,
    "skewed": ["ad0"] * 8 + ["ad5", "ad7", "ad0", "ad2"],
    "some_none": [None, "ad1", None, "ad1", "ad4", None],
    "all_none": [None] * 3,
    "one_row": ["ad8"],
}


@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("seed", [11, 12])
def test_routed_forward_equals_reference_loop(mix, seed):
    model = layer_model({n: 4 for n in NAMES}, seed)
    assert routed_vs_reference(model, MIXES[mix], seed + 100) <= 1e-5


@pytest.mark.parametrize("mix", [m for m in MIXES if m != "all_none"] + ["padded_noncontiguous", "mixed_ranks"])
@pytest.mark.parametrize("tokens", [1, 4])
def test_grouped_and_gather_paths_both_equal_the_reference(mix, tokens):
    """Routing picks grouped (per distinct adapter) or gather (per row) by a rule; force each and hold both."""
    from rankdial.lora import LoraLayer

    ranks = {"r2": 2, "r8": 8, "r16": 16, "r1": 1} if mix == "mixed_ranks" else {n: 4 for n in NAMES}
    rows = {"padded_noncontiguous": ["ad7", "ad2", None, "ad7", "ad7", "ad5", "ad2"],
            "mixed_ranks": ["r16", "r2", None, "r8", "r2", "r1", "r16", "r16"]}.get(mix) or MIXES.get(mix)
    model = layer_model(ranks, 5)
    x = torch.randn(len(rows), tokens, D_IN, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = reference_rows(model[0], x, rows)
        route(model, rows)
        routing = model[0].routing
        assert isinstance(model[0], LoraLayer) and routing.plans and all(p.groups for p in routing.plans)
        for grouped in (True, False):
            routing.grouped = grouped
            assert (model(x) - ref).abs().max().item() <= 1e-5, grouped


def test_the_rule_groups_shared_adapters_and_gathers_distinct_ones():
    model = layer_model({n: 4 for n in NAMES}, 1)
    for rows, grouped in ((MIXES["all_same"], True), (MIXES["skewed"], False), (NAMES, False),
                          (["ad1", "ad2"] * 4, True), (["ad1", None, "ad1", None], True)):
        route(model, rows)
        assert model[0].routing.grouped is grouped, rows
    clear_route(model)


@pytest.mark.parametrize("seed", [3, 4])
def test_mixed_ranks_in_one_batch(seed):
    model = layer_model({"r2": 2, "r8": 8, "r16": 16, "r1": 1}, seed, bias=False)
    rows = ["r16", "r2", None, "r8", "r2", "r1", "r16", "r16"]
    assert routed_vs_reference(model, rows, seed + 7, tokens=3) <= 1e-5


def test_each_row_gets_its_own_adapter_not_a_neighbours():
    model = layer_model({"a": 4, "b": 4}, 5)
    x = torch.randn(1, 2, D_IN).expand(3, 2, D_IN).contiguous()  # the same input on every row
    with torch.no_grad():
        route(model, ["a", "b", None])
        out = model(x)
        base = model[0].base_layer(x)
    assert (out[0] - out[1]).abs().max() > 1e-3 and (out[0] - out[2]).abs().max() > 1e-3
    assert torch.equal(out[2], base[2])  # no adapter: exactly the base


def test_two_dimensional_input_rows_are_the_first_dimension():
    model = layer_model({"a": 3, "b": 5}, 6)
    x = torch.randn(4, D_IN)
    with torch.no_grad():
        route(model, ["b", None, "a", "b"])
        fast = model(x)
    assert (fast - reference_rows(model[0], x, ["b", None, "a", "b"])).abs().max() <= 1e-5


def test_unknown_adapter_names_the_loaded_ones():
    model = layer_model({"chat": 4, "sql": 4}, 7)
    with pytest.raises(rd.AdapterError, match=r"unknown adapter\(s\) \['shell'\].*\['chat', 'sql'\]"):
        route(model, ["chat", "shell"])


def test_merged_adapters_refuse_routing():
    model = layer_model({"chat": 4, "sql": 4}, 8)
    rd.set_active(model, "chat")
    rd.merge(model)
    with pytest.raises(rd.MergeError, match="unmerge"):
        route(model, ["sql", None])


def test_row_count_mismatch_and_bad_rows_are_refused():
    model = layer_model({"a": 4}, 9)
    route(model, ["a", None])
    with pytest.raises(rd.errors.RequestError, match="routed for 2 rows.*batch has 3"):
        model(torch.randn(3, 2, D_IN))
    for bad in ([], "a", [3]):
        with pytest.raises(rd.errors.RequestError, match="one adapter name"):
            route(model, bad)


def test_training_mode_with_dropout_is_refused():
    torch.manual_seed(0)
    layer = rd.LoraLayer(nn.Linear(D_IN, D_OUT))
    layer.add_adapter("a", r=4, alpha=8, dropout=0.1)
    with pytest.raises(rd.ConfigError, match="model.eval"):
        route(nn.Sequential(layer).train(), ["a"])


def test_stack_is_reused_until_the_adapters_change():
    model = layer_model({"a": 4, "b": 2}, 10)
    route(model, ["a", "b"])
    stack = model[0].routing.stacks
    route(model, ["b", None, "a"])
    assert model[0].routing.stacks is stack  # same adapters: not rebuilt
    with torch.no_grad():
        model[0].lora_B["b"].weight.mul_(3.0)  # an in-place update through autograd's version counter (copy_, mul_)
    route(model, ["b", "a"])
    assert model[0].routing.stacks is not stack
    stack = model[0].routing.stacks
    model[0].scaling["a"] *= 0.5  # a scaling change alone
    route(model, ["b", "a"])
    assert model[0].routing.stacks is not stack
    assert routed_vs_reference(model, ["b", "a", None], 31) <= 1e-5
    model[0].add_adapter("c", r=6, alpha=6, init_lora_weights=False)
    assert routed_vs_reference(model, ["c", "b", "a", None], 33) <= 1e-5


def test_an_adapter_deleted_and_added_again_under_its_name_is_rebuilt():
    model = layer_model({"a": 4}, 12)
    route(model, ["a"])
    for seed in range(20):  # a registry's unload/load cycle: Python may reuse the freed tensors' ids
        model[0].delete_adapter("a")
        torch.manual_seed(seed)
        model[0].add_adapter("a", r=4, alpha=8, init_lora_weights=False)
        assert routed_vs_reference(model, ["a"], seed) <= 1e-5


def test_a_fused_optimizer_step_needs_refresh_and_a_dtype_change_is_seen():
    model = layer_model({"a": 4, "b": 4}, 13)
    route(model, ["a", "b"])
    layer = model[0]
    opt = torch.optim.AdamW([layer.lora_A["a"].weight], lr=0.5, fused=True)
    layer.lora_A["a"].weight.grad = torch.ones_like(layer.lora_A["a"].weight)
    opt.step()  # fused kernels do not bump the version counter
    x = torch.randn(2, 3, D_IN)
    with torch.no_grad():
        route(model, ["a", "b"], refresh=True)
        torch.testing.assert_close(model(x), reference_rows(layer, x, ["a", "b"]), rtol=1e-5, atol=1e-5)
    model.double()
    with torch.no_grad():
        route(model, ["a", "b"])
        assert layer.routing.stacks.dtype == torch.float64


def test_an_active_whole_module_copy_or_disabled_is_honoured():
    model = tiny_model("llama")
    rd.inject(model, rd.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]), adapter="x")
    with pytest.raises(rd.AdapterError, match="active and replaces the whole module lm_head"):
        route(model, [None])
    rd.set_active(model, [])
    ids = token_batch(batch=2)
    base = model_output(tiny_model("llama"), ids)
    route(model, [None, None])
    torch.testing.assert_close(model_output(model, ids), base, rtol=1e-5, atol=1e-6)
    with rd.disabled(model):
        torch.testing.assert_close(model_output(model, ids), base, rtol=1e-5, atol=1e-6)


def test_clear_route_restores_set_active():
    model = layer_model({"a": 4, "b": 4}, 12)
    x = torch.randn(3, 4, D_IN)
    rd.set_active(model, "b")
    with torch.no_grad():
        before = model(x)
        route(model, ["a", "a", "a"])
        routed = model(x)
        clear_route(model)
        after = model(x)
    assert torch.equal(before, after) and (routed - before).abs().max() > 1e-3
    assert model[0].routing is None


def llama_with_adapters(seed: int):
    """The tiny Llama with three adapters of ranks 2, 8 and 16 (non-zero B), different targets."""
    model = tiny_model("llama", seed=seed)
    targets = {"r2": ["q_proj", "v_proj"], "r8": "all-linear", "r16": ["o_proj", "down_proj", "up_proj"]}
    for name, target in targets.items():
        r = int(name[1:])
        rd.inject(model, rd.LoraConfig(r=r, lora_alpha=r + 3, target_modules=target, init_lora_weights=False), adapter=name)
    return model.eval()


def per_row_alone(model, ids: torch.Tensor, rows: list[str | None]) -> torch.Tensor:
    """Each row's logits run alone, with set_active(that adapter) or, for None, disabled()."""
    outs = []
    for i, name in enumerate(rows):
        if name is None:
            with rd.disabled(model):
                outs.append(model_output(model, ids[i:i + 1]))
        else:
            rd.set_active(model, name)
            outs.append(model_output(model, ids[i:i + 1]))
    return torch.cat(outs)


@pytest.mark.slow
@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "nf4"])
def test_whole_llama_routed_batch_equals_each_row_alone(quantized):
    model = llama_with_adapters(seed=21 if quantized else 20)
    if quantized:
        rd.quantize_model(model)
    rows = ["r16", None, "r2", "r8", "r16", "r16", None]
    ids = token_batch(seed=5, batch=len(rows), length=9)
    alone = per_row_alone(model, ids, rows)
    route(model, rows)
    batched = model_output(model, ids)
    clear_route(model)
    assert (batched - alone).abs().max() <= 1e-5
    assert (alone[0] - per_row_alone(model, ids[:1], [None])).abs().max() > 1e-3  # the adapters do change the logits


def test_disabled_computes_the_base_for_every_routed_row():
    model = layer_model({"a": 4, "b": 2}, 14)
    x = torch.randn(2, 3, D_IN)
    with torch.no_grad():
        route(model, ["a", "b"])
        with rd.disabled(model):
            torch.testing.assert_close(model(x), model[0].base_layer(x))
        assert not torch.allclose(model(x), model[0].base_layer(x))


def stacked_model(ranks: dict[str, int], seed: int) -> nn.Sequential:
    """One LoraLayer whose adapters live only in its serving stacks (as the registry holds them)."""
    from rankdial.serve import AdapterStacks

    torch.manual_seed(seed)
    layer = rd.LoraLayer(nn.Linear(D_IN, D_OUT))
    layer.stacks = AdapterStacks.for_layer(layer)
    for k, (name, r) in enumerate(ranks.items()):
        layer.stacks.add(name, torch.randn(r, D_IN) * 0.3, torch.randn(D_OUT, r) * 0.3, (2.0 * r + k) / r)
    return nn.Sequential(layer).eval()


@pytest.mark.parametrize("grouped", [True, False])
def test_stacks_by_rank_hold_each_adapter_once_and_route_like_the_reference(grouped):
    model = stacked_model({"a": 2, "b": 16, "c": 2, "d": 5}, 40)
    stacks = model[0].stacks
    assert sorted(stacks.stacks) == [2, 5, 16] and len(stacks.stacks[2].names) == 2  # no rank pads another
    assert stacks.nbytes == (2 + 2 + 16 + 5) * (D_IN + D_OUT) * 4
    rows = ["b", "a", None, "c", "a", "d", "b", "b"]
    x = torch.randn(len(rows), 3, D_IN, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        route(model, rows)
        model[0].routing.grouped = grouped
        assert (model(x) - reference_rows(model[0], x, rows)).abs().max() <= 1e-5
    stacks.remove("a")
    assert stacks.stacks[2].names == [None, "c"] and stacks.nbytes == (2 + 2 + 16 + 5) * (D_IN + D_OUT) * 4
    stacks.add("e", torch.randn(2, D_IN), torch.randn(D_OUT, 2), 1.0)
    assert stacks.where["e"] == (2, 0)  # the free slot is reused: nothing grows
    stacks.remove("d")
    assert 5 not in stacks.stacks  # a rank's last adapter gives its memory back
    stacks.remove("e")
    stacks.trim()
    assert stacks.stacks[2].names == ["c"] and stacks.where["c"] == (2, 0)
    assert stacks.nbytes == (2 + 16) * (D_IN + D_OUT) * 4
    rows = ["c", "b", None]
    with torch.no_grad():
        route(model, rows)
        assert (model(x[:3]) - reference_rows(model[0], x[:3], rows)).abs().max() <= 1e-5


def test_route_keeps_the_routing_while_rows_and_stacks_are_unchanged(monkeypatch):
    """route() at every step is cheap (issue 19 defect 6): same rows, untouched stacks: the same Routing, no key
    computed; new rows or a changed stack: a new one."""
    import importlib

    bl = importlib.import_module("rankdial.serve.batched_lora")  # the package exports a function of that name

    model = stacked_model({"a": 4, "b": 4}, 41)
    monkeypatch.setattr(bl, "stack_key", lambda layer: pytest.fail("registry stacks are never re-keyed"))
    route(model, ["a", "b", None])
    first = model[0].routing
    route(model, ["a", "b", None])
    assert model[0].routing is first
    route(model, ["b", "a"])
    assert model[0].routing is not first and model[0].routing.slot(0) == (4, 1)
    second = model[0].routing
    model[0].stacks.add("c", torch.randn(4, D_IN), torch.randn(D_OUT, 4), 1.0)
    route(model, ["b", "a"])
    assert model[0].routing is not second


@pytest.mark.parametrize("tokens", [1, 3])
def test_distinct_adapters_within_a_range_are_read_through_a_view_of_the_stack(tokens):
    """Rows with distinct adapters whose slots lie in a short range (gaps included) run over a view of the stack
    instead of copying each row's adapter; the same sums as the reference and as the plain gather."""
    model = layer_model({n: 4 for n in NAMES}, 6)
    rows = ["ad1", "ad4", None, "ad2", "ad6"]  # slots 1, 4, 2, 6 of ad0..ad8: a range of 6 for 4 adapters
    x = torch.randn(len(rows), tokens, D_IN, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = reference_rows(model[0], x, rows)
        route(model, rows)
        (plan,) = model[0].routing.plans
        assert plan.by_view and not plan.grouped and isinstance(plan.group_tensors()[0], slice)
        assert (model(x) - ref).abs().max().item() <= 1e-5
        model[0].routing.grouped = False  # the plain gather
        assert not plan.by_view and (model(x) - ref).abs().max().item() <= 1e-5
        route(model, ["ad0", "ad8"])  # a range of 9 for 2 adapters: copied, not viewed
        assert not model[0].routing.plans[0].by_view


@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("rows", [["ad3"] * 6, ["ad1", "ad1", "ad5", "ad5"], ["ad0", "ad1", "ad2", "ad3"]])
def test_groups_that_are_the_rows_in_order_add_in_place_like_the_reference(rows, tokens):
    """One adapter on every row, equal runs in slot order, or every row its own adapter in slot order: the
    grouped matmuls read x and write h directly (no gather of x, no index_add_), and still equal the reference;
    the same rows in another order, or with a base row, take the copying path and equal it too."""
    model = layer_model({n: 4 for n in NAMES}, 7)
    g = torch.Generator().manual_seed(tokens)
    for mix, direct in ((rows, True), (rows[::-1] if len(set(rows)) > 1 else rows[:-1] + [None], False),
                        (rows + [None], False)):
        x = torch.randn(len(mix), tokens, D_IN, generator=g)
        with torch.no_grad():
            ref = reference_rows(model[0], x, mix)
            route(model, mix)
            (plan,) = model[0].routing.plans
            assert plan.grouped or plan.by_view
            assert (plan.group_tensors()[1] is None) is direct, mix
            assert (model(x) - ref).abs().max().item() <= 1e-6 * ref.abs().max().item(), mix  # fp32 rounding
    clear_route(model)


def test_in_place_groups_follow_stacks_that_change_between_steps():
    """Adapters loaded and unloaded between two forwards of the same rows: each forward reads the stacks as they
    are then (the rows' slots move), in place or not, equal to the reference."""
    model = stacked_model({"a": 4, "b": 4}, 42)
    stacks = model[0].stacks
    x = torch.randn(4, 2, D_IN, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for step in range(4):
            rows = ["a", "a", "b", "b"]
            route(model, rows)
            assert model[0].routing.plans[0].group_tensors()[1] is None or stacks.where["a"][1] > stacks.where["b"][1]
            ref = reference_rows(model[0], x, rows)
            assert (model(x) - ref).abs().max().item() <= 1e-6 * ref.abs().max().item(), step
            stacks.remove("a")  # "a" comes back in another slot, with other weights
            stacks.add("a", torch.randn(4, D_IN) * (step + 1), torch.randn(D_OUT, 4), 1.5)
            if step == 1:
                stacks.trim()


def test_base_only_rows_do_no_adapter_work(monkeypatch):
    """A batch of base rows computes the base alone (no plan, no adapter matmul), bitwise; base rows in a mixed
    batch take no part in any plan."""
    import importlib

    bl = importlib.import_module("rankdial.serve.batched_lora")
    model = layer_model({"a": 4, "b": 2}, 8)
    x = torch.randn(3, 2, D_IN)
    for name in ("batched_lora", "grouped_lora"):
        monkeypatch.setattr(bl, name, lambda *a, name=name: pytest.fail(f"{name} ran for base rows"))
    with torch.no_grad():
        route(model, [None, None, None])
        assert model[0].routing.plans == [] and torch.equal(model(x), model[0].base_layer(x))
    monkeypatch.undo()
    with torch.no_grad():
        route(model, [None, "a", None, "b", "a"])
        assert sorted(r for p in model[0].routing.plans for r in p.rows) == [1, 3, 4]
    clear_route(model)
