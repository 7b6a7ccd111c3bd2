"""The adapter registry: safe names and paths, refusals with the reason, a byte-budget LRU with pinning."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import torch

from rankdial.errors import AdapterError, AdapterFileError, AdapterInUse
from rankdial.memory import process_status_bytes
from rankdial.models import load_model, resolve_model
from rankdial.serve import AdapterRegistry, Engine, SamplingParams
from conftest import make_model_dir
from engine_helpers import PROMPTS, make_adapter

SIZE_R4 = 4 * (4 * (256 + 256) + 3 * (256 + 768)) * 4 * 4  # r·(d_in+d_out) over 7 linears × 4 layers, float32


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for k in range(4):
        make_adapter(root / f"a{k}", seed=k, r=4)
    make_adapter(root / "small", seed=7, r=2, targets=["q_proj"])
    return root


@pytest.fixture
def registry(root):
    model, _ = load_model(resolve_model("default"))
    reg = AdapterRegistry(model, root)
    yield reg
    reg.close()


def test_names_are_the_adapter_folders(registry, root):
    (root / "not-an-adapter").mkdir(exist_ok=True)
    assert registry.names() == ["a0", "a1", "a2", "a3", "small"]
    info = registry.info("a1")
    assert (info.name, info.loaded, info.pinned, info.rank) == ("a1", False, False, 4)
    with pytest.raises(AdapterError, match="a0"):
        registry.info("zzz")


def test_load_on_first_use_then_hits(registry):
    info = registry.load("a0")
    assert info.loaded and info.bytes == SIZE_R4 and registry.loaded_bytes == SIZE_R4
    registry.load("a0")
    assert (registry.hits, registry.misses) == (1, 1)
    assert registry.loaded() == ["a0"]


@pytest.mark.parametrize("name", ["../a0", "/etc", "a0/../a1", "a.b", "_x", "-x", "", "a b", None, 3])
def test_names_that_are_not_plain_folder_names_are_refused(registry, name):
    with pytest.raises(AdapterError, match="plain folder name"):
        registry.load(name)
    assert registry.loaded() == []


def test_paths_outside_root_are_refused_unless_allowed(registry, root, tmp_path):
    outside = make_adapter(tmp_path / "elsewhere", seed=3, r=2, targets=["q_proj"])
    for path in [str(outside), "../" + outside.name, root / ".." / "x"]:
        with pytest.raises(AdapterFileError, match="outside the adapters folder"):
            registry.load("x", path)
    link = root / "link-out"
    link.symlink_to(outside, target_is_directory=True)
    try:
        with pytest.raises(AdapterFileError, match="outside the adapters folder"):
            registry.load("link-out")
    finally:
        link.unlink()
    assert registry.loaded() == []
    assert registry.load("x", outside, allow_any_path=True).loaded  # the admin's load by path
    assert "x" in registry.names()



def test_an_admin_relative_path_is_read_from_the_adapters_folder_and_echoed_as_given(registry, root, tmp_path,
                                                                                    monkeypatch):
    # a relative path meant the adapters folder without the admin permission and the server's working folder with
    # it; and a missing one was echoed to the client as the server's absolute path
    cwd = tmp_path / "server" / "cwd"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    outside = make_adapter(tmp_path / "there", seed=3, r=2, targets=["q_proj"])
    assert registry.load("rel", os.path.relpath(outside, root), allow_any_path=True).loaded
    with pytest.raises(AdapterFileError) as caught:
        registry.load("gone", "../nowhere", allow_any_path=True)
    message = str(caught.value)
    assert "../nowhere is not a folder" in message and "/" + tmp_path.parts[1] not in message, message
    registry.unload("rel")

def test_pickle_only_adapter_is_never_loaded(registry, root, tmp_path):
    folder = root / "pickled"
    shutil.copytree(root / "a0", folder)
    tensors = __import__("safetensors.torch", fromlist=["load_file"]).load_file(folder / "adapter_model.safetensors")
    torch.save(tensors, folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    try:
        with pytest.raises(AdapterFileError, match="pickle"):
            registry.load("pickled")
    finally:
        shutil.rmtree(folder)


def test_a_weights_path_that_is_not_a_file_is_named_for_what_it_is(registry, root):
    folder = root / "weights-not-a-file"
    shutil.copytree(root / "a0", folder)
    weights = folder / "adapter_model.safetensors"
    try:
        weights.unlink()
        weights.mkdir()
        with pytest.raises(AdapterFileError, match="is not a regular file \\(a directory\\); put the saved"):
            registry.load("weights-not-a-file")
        weights.rmdir()
        weights.symlink_to(folder / "nowhere")
        with pytest.raises(AdapterFileError, match="is not a regular file \\(a broken link\\)"):
            registry.load("weights-not-a-file")
    finally:
        shutil.rmtree(folder)


def test_adapter_for_another_base_is_refused_and_others_keep_serving(root, tmp_path):
    other = make_adapter(root / "other-base", seed=1, r=4, base=make_model_dir(tmp_path / "tiny"))
    wrong_targets = root / "wrong-targets"
    shutil.copytree(root / "a1", wrong_targets)
    config = json.loads((wrong_targets / "adapter_config.json").read_text())
    (wrong_targets / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["wq", "wv"]}))
    eng = Engine.from_pretrained("default", str(root), device="cpu")
    try:
        with pytest.raises(AdapterFileError, match="refused.*shape"):
            eng.registry.load("other-base")
        with pytest.raises(AdapterFileError, match="refused"):
            eng.registry.load("wrong-targets")
        bad = eng.submit(PROMPTS[0], "wrong-targets", SamplingParams(max_tokens=3, temperature=0))
        good = eng.submit(PROMPTS[0], "a2", SamplingParams(max_tokens=3, temperature=0))
        final = list(bad.events(timeout=60))[-1]
        assert final.finish_reason == "error" and "wq" in final.error and "\n" not in final.error
        assert good.result(timeout=60).finish_reason == "length"
        assert eng.registry.loaded() == ["a2"]
    finally:
        eng.shutdown(drain=False)
        shutil.rmtree(other)
        shutil.rmtree(wrong_targets)


def test_lru_bounded_by_bytes_with_pinning(root):
    model, _ = load_model(resolve_model("default"))
    reg = AdapterRegistry(model, root, budget_bytes=int(2.5 * SIZE_R4))
    reg.load("a0", pin=True)
    reg.load("a1")
    reg.load("a2")  # a1 is the least recently used that is not pinned
    assert reg.loaded() == ["a0", "a2"] and reg.evictions == 1
    reg.load("small")  # a small adapter fits beside them: ranks differ, so the budget counts bytes
    assert set(reg.loaded()) == {"a0", "a2", "small"} and reg.evictions == 1
    reg.acquire("a2")  # in use by a running request: never evicted
    with pytest.raises(AdapterError, match="pinned adapters or adapters in use"):
        reg.load("a3")
    reg.release("a2")
    reg.unpin("a0")
    reg.load("a3")
    assert "a3" in reg.loaded() and reg.loaded_bytes <= reg.budget_bytes
    assert reg.info("a0").loaded is False and reg.evictions == 3  # a0, then small or a2
    reg.close()


def test_unload_at_run_time_and_in_use(registry):
    registry.load("a1")
    registry.acquire("a1")
    with pytest.raises(AdapterInUse, match="in use"):  # a 409 from the server
        registry.unload("a1")
    registry.release("a1")
    assert registry.unload("a1") is True
    assert registry.unload("a1") is False  # known, no longer loaded: nothing to free
    assert registry.loaded() == [] and registry.loaded_bytes == 0
    assert not any("lora" in n for n, _ in registry.model.named_modules())  # the wrappers are gone too


def test_load_async_reads_off_the_calling_thread(registry):
    future = registry.load_async("a3")
    assert future.result(timeout=30).loaded
    assert registry.load_async("a3").done() and registry.hits == 1


def test_a_finished_load_leaves_no_pending_future(root, tmp_path):
    """A refused load's exception (its traceback holds the read tensors) must not stay in the registry."""
    other = make_adapter(root / "other-base2", seed=1, r=4, base=make_model_dir(tmp_path / "tiny"))
    model, _ = load_model(resolve_model("default"))
    reg = AdapterRegistry(model, root)
    try:
        refused, loaded = reg.load_async("other-base2"), reg.load_async("a1")
        with pytest.raises(AdapterFileError, match="refused"):
            refused.result(timeout=30)
        assert loaded.result(timeout=30).loaded
        deadline = time.monotonic() + 10  # the done-callback runs just after the waiters wake
        while reg._pending and time.monotonic() < deadline:
            time.sleep(0.01)
        assert reg._pending == {}
    finally:
        reg.close()
        shutil.rmtree(other)


def test_the_plan_cache_is_bounded(registry, monkeypatch):
    from rankdial.serve import registry as registry_module

    monkeypatch.setattr(registry_module, "_MAX_PLANS", 2)
    from rankdial.config import LoraConfig

    for r in (2, 4, 8, 16):
        registry._plan(LoraConfig(r=r, target_modules=["q_proj"]))
    assert len(registry._plans) == 2


def test_model_output_after_load_unload_is_the_base(registry):
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = registry.model(input_ids=ids).logits
        registry.load("a0")
        registry.unload("a0")
        after = registry.model(input_ids=ids).logits
    assert torch.equal(before, after)


@pytest.mark.slow
def test_a_thousand_load_unload_cycles_leave_memory_flat(registry):
    def rss() -> int:
        return process_status_bytes("VmRSS")

    for _ in range(100):  # warm up allocator pools
        registry.load("small")
        registry.unload("small")
    before = rss()
    for _ in range(1000):
        registry.load("small")
        registry.unload("small")
    grown = rss() - before
    assert registry.loaded() == [] and registry.misses == 1100
    assert grown < 16 * 2 ** 20, f"resident memory grew by {grown / 2 ** 20:.1f} MiB over 1,000 cycles"


def test_load_copies_the_file_exactly_and_draws_no_random_numbers(registry, root):
    from safetensors.torch import load_file

    from rankdial.lora import lora_layers

    state = torch.random.get_rng_state()
    registry.load("a2")
    assert torch.equal(torch.random.get_rng_state(), state)  # written straight into the stacks: no initialisation
    tensors = load_file(str(root / "a2" / "adapter_model.safetensors"))
    layers = [(path, layer) for path, layer in lora_layers(registry.model) if "a2" in layer.stacks.where]
    assert len(layers) * 2 == len(tensors)
    for path, layer in layers:
        A, B, _ = layer.stacks.weights("a2")
        assert not layer.lora_A and not A.requires_grad  # the stacks are the one copy: no modules per adapter
        assert torch.equal(A, tensors[f"base_model.model.{path}.lora_A.weight"])
        assert torch.equal(B, tensors[f"base_model.model.{path}.lora_B.weight"])


def held_bytes(model) -> int:
    """Every byte of tensor storage the model's LoRA layers reach beyond their base: adapter parameters, routed
    stacks, routing state (gather caches included), found by walking the objects, each storage counted once."""
    from rankdial.lora import lora_layers

    seen: dict[int, int] = {}

    def walk(obj, depth):
        if isinstance(obj, torch.Tensor):
            seen[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
        elif depth and isinstance(obj, (list, tuple)):
            for item in obj:
                walk(item, depth - 1)
        elif depth and isinstance(obj, dict):
            for item in obj.values():
                walk(item, depth - 1)
        elif depth and hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)):
            walk(vars(obj), depth - 1)

    for _, layer in lora_layers(model):
        for name, t in layer.named_parameters():
            if not name.startswith("base_layer."):
                walk(t, 0)
        walk(layer.routing, 5)
        walk(getattr(layer, "stacks", None), 5)
    return sum(seen.values())


def test_resident_bytes_stay_under_the_budget_with_mixed_ranks(root, tmp_path):
    """Many rank-4 adapters and one rank-64 (issue 19): what the layers hold, routed and run, stays within the
    budget; a stack padded to the largest rank would hold 16x the rank-4 adapters' bytes."""
    from rankdial.serve import route

    make_adapter(tmp_path / "big", seed=9, r=64)
    for k in range(4, 8):
        make_adapter(tmp_path / f"a{k}", seed=k, r=4)
    for k in range(4):
        shutil.copytree(root / f"a{k}", tmp_path / f"a{k}")
    model, _ = load_model(resolve_model("default"))
    budget = 26 * SIZE_R4  # room for the eight rank-4 adapters and the rank-64 one (16 x SIZE_R4)
    reg = AdapterRegistry(model, tmp_path, budget_bytes=budget)
    ids = torch.tensor([[5, 6, 7]] * 9)
    names = [f"a{k}" for k in range(8)] + ["big"]
    for name in names:
        reg.load(name)
        with torch.no_grad():
            route(model, reg.loaded() + [None] * (9 - len(reg.loaded())))
            model(input_ids=ids)  # a forward: gather caches and the like are held now too
        assert held_bytes(model) <= budget, (name, held_bytes(model), budget)
        assert reg.loaded_bytes <= budget
    assert sorted(reg.loaded()) == sorted(names) and reg.evictions == 0
    reg.close()


def test_a_transient_read_error_is_not_remembered(registry, monkeypatch):
    """OSError / MemoryError say nothing about the files: the next request reads them again (and loads)."""
    import rankdial.serve.registry as reg_mod

    real = reg_mod.read_adapter_weights
    for transient in (OSError("EIO: input/output error"), MemoryError()):
        registry.unload("a1") if registry.is_loaded("a1") else None
        monkeypatch.setattr(reg_mod, "read_adapter_weights", lambda *a, _e=transient, **k: (_ for _ in ()).throw(_e))
        with pytest.raises(AdapterFileError):
            registry.load("a1")
        assert registry.failure("a1") is None
        monkeypatch.setattr(reg_mod, "read_adapter_weights", real)
        assert registry.load("a1").loaded


def test_a_failure_is_remembered_against_the_files_before_the_read(root, tmp_path, monkeypatch):
    """Files fixed while a failed read ran: the failure is not remembered against the fixed files."""
    import rankdial.serve.registry as reg_mod

    shutil.copytree(root / "a2", tmp_path / "fixme")
    cfg = tmp_path / "fixme" / "adapter_config.json"
    good = cfg.read_text()
    cfg.write_text("{broken")
    real = reg_mod.read_adapter_config

    def read_then_fix(folder):
        try:
            return real(folder)
        finally:
            cfg.write_text(good)  # the user's fix lands while the read fails
            os.utime(cfg, ns=(time.time_ns() + 10**9,) * 2)

    monkeypatch.setattr(reg_mod, "read_adapter_config", read_then_fix)
    model, _ = load_model(resolve_model("default"))
    reg = AdapterRegistry(model, tmp_path)
    try:
        with pytest.raises(AdapterFileError):
            reg.load("fixme")
        assert reg.failure("fixme") is None  # the signature was of the broken files, not of the fixed ones
        monkeypatch.setattr(reg_mod, "read_adapter_config", real)
        assert reg.load("fixme").loaded
    finally:
        reg.close()


def test_load_async_never_returns_a_finished_load(registry):
    """Between a load's end and its done-callback the finished future is still pending: it is not reused."""
    from concurrent.futures import Future

    failed: Future = Future()
    failed.set_exception(AdapterFileError("an old failure"))
    registry._pending["a3"] = failed
    assert registry.load_async("a3").result(30).loaded


def test_info_of_an_adapter_evicted_meanwhile_is_not_a_key_error(registry, monkeypatch):
    """info() reads the loaded state under the lock: an eviction on another thread cannot fall in between."""
    import threading

    registry.load("a0")
    seen = []

    def evict_meanwhile(name):  # another thread's eviction, which must wait for the lock info() holds
        t = threading.Thread(target=registry.unload, args=(name,))
        t.start()
        t.join(0.2)
        seen.append(t)
        return True

    monkeypatch.setattr(registry, "check_known", lambda name: name)
    real = registry._paths.get
    monkeypatch.setattr(registry, "_paths", type("P", (dict,), {"get": lambda self, n: evict_meanwhile(n) and real(n)})())
    info = registry.info("a0")
    assert info.loaded and info.rank == 4
    seen[0].join(5)
    assert not registry.is_loaded("a0")


def test_a_failed_attach_leaves_nothing_of_the_adapter(registry):
    """Issue 19: an attach that fails partway (here: copying the last module's weights) leaves no layer holding a
    part of the adapter; the registry does not count it and the same adapter loads cleanly afterwards."""
    from rankdial.lora import lora_layers

    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        base = registry.model(input_ids=ids).logits
    read = registry.read("a1")
    last = sorted(read.tensors)[-1]
    read.tensors[last] = torch.empty(read.tensors[last].shape, device="meta")  # right shape, cannot be copied
    with pytest.raises(Exception):
        registry.attach(read)
    assert not [p for p, layer in lora_layers(registry.model) if "a1" in layer.lora_A]
    assert not registry.is_loaded("a1") and registry.loaded_bytes == 0
    with torch.no_grad():
        assert torch.equal(registry.model(input_ids=ids).logits, base)
    assert registry.load("a1").loaded


def test_a_listing_takes_the_lock_once_not_per_adapter(registry):
    """Issue 19: GET /v1/models took the engine's step lock once or twice per adapter; the listing reads one
    snapshot (one acquisition) whatever the number of adapters."""
    for name in ("a0", "a2"):
        registry.load(name)
    lock, taken = registry.lock, []

    class Counting:
        def __enter__(self):
            taken.append(1)
            return lock.__enter__()

        def __exit__(self, *exc):
            return lock.__exit__(*exc)

    from fastapi.testclient import TestClient

    from fake_engine import FakeEngine
    from rankdial.serve.api import create_app

    with TestClient(create_app(FakeEngine(registry=registry))) as c:
        registry.lock = Counting()
        cards = c.get("/v1/models").json()["data"]
        registry.lock = lock
    assert len(taken) == 1 and len(cards) == 1 + len(registry.names())
    listing = registry.listing()
    by_name = {info.name: (info, failure) for info, failure in listing}
    assert set(by_name) == set(registry.names())
    assert by_name["a0"][0] == registry.info("a0") and by_name["a1"][0] == registry.info("a1")
    assert by_name["a1"][0].loaded is False and by_name["a1"][0].rank == 4


def test_two_loads_of_one_new_name_from_different_folders_never_rebind_it(registry, root):
    """Two admins load the same new name by path at once: both pass the 'name exists' check, both read; the one
    whose attach comes second must be refused (a 409 from the server), never answered with the other's weights."""
    from rankdial.errors import NameTaken

    first = registry.read("new", root / "a0", allow_any_path=True)
    second = registry.read("new", root / "a1", allow_any_path=True)
    registry.attach(first, by_path=True)
    with pytest.raises(NameTaken, match="another folder"):
        registry.attach(second, by_path=True)
    assert registry.attach(registry.read("new", root / "a0", allow_any_path=True), by_path=True).loaded  # same one
    with pytest.raises(NameTaken, match="already loaded"):
        registry.load("new", root / "a2", allow_any_path=True)


def test_an_adapter_for_another_base_is_named_once_in_its_refusal(registry, tmp_path):
    """A folder whose A and B agree with each other but not with this base is refused at attach; the message names
    the adapter once and its file once (it read "adapter 'x' refused: adapter 'x' (/path) does not fit ...")."""
    from safetensors.torch import load_file, save_file

    make_adapter(tmp_path / "wide", seed=3, r=4)
    weights = tmp_path / "wide" / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: torch.zeros(v.shape[0], v.shape[1] + 2) if "lora_A" in k else torch.zeros(v.shape[0] + 2, v.shape[1])
               for k, v in tensors.items()}, weights)
    with pytest.raises(AdapterFileError) as err:
        registry.load("wide", tmp_path / "wide", allow_any_path=True)
    message = str(err.value)
    assert "does not fit this model" in message and message.count("'wide'") == 1, message
    assert message.count("adapter_model.safetensors") == 1, message


@pytest.fixture
def by_path_setup(tmp_path):
    root = tmp_path / "adapters"
    root.mkdir()
    make_adapter(root / "a0", seed=0, r=4)
    ext = tmp_path / "ext"
    make_adapter(ext, seed=1, r=4)
    model, _ = load_model(resolve_model("default"))
    reg = AdapterRegistry(model, root)
    yield reg, root, ext
    reg.close()


def test_two_by_name_loads_of_an_evicted_by_path_adapter_are_not_a_conflict(by_path_setup):
    """Same folder read twice (the engine's load_async and an HTTP pin at once): no NameTaken (found by review)."""
    reg, root, ext = by_path_setup
    reg.attach(reg.read("ext", ext, allow_any_path=True), by_path=True)
    with reg.lock:
        reg._evict("ext")  # LRU eviction: the name stays known by its path
    a, b = reg.read("ext"), reg.read("ext")  # e.g. engine load_async and an HTTP pin, at once
    reg.attach(a)
    reg.attach(b)  # same folder: must not be NameTaken


def test_a_by_path_reload_racing_a_by_name_load_of_the_same_folder_is_not_a_conflict(by_path_setup):
    reg, root, ext = by_path_setup
    reg.attach(reg.read("ext", ext, allow_any_path=True), by_path=True)
    with reg.lock:
        reg._evict("ext")
    engine_read = reg.read("ext")  # the engine's load_async (by name, resolved through _paths)
    reg.attach(reg.read("ext", ext, allow_any_path=True), by_path=True)  # the admin reloads it by path meanwhile
    reg.attach(engine_read)  # same folder: must not be NameTaken


def test_a_file_that_cannot_be_opened_is_not_remembered_and_loads_once_readable(registry, monkeypatch):
    """A permission problem is the machine's, not the files': fixed (chmod does not change the files' signature),
    the next request loads the adapter."""
    import rankdial.adapters.io as io_mod

    registry.unload("a2") if registry.is_loaded("a2") else None

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(io_mod, "open", denied, raising=False)
    with pytest.raises(AdapterFileError, match="cannot be opened \\(Permission denied\\)"):
        registry.load("a2")
    assert registry.failure("a2") is None
    monkeypatch.undo()
    assert registry.load("a2").loaded


def test_a_weights_file_linked_out_of_the_adapters_folder_is_refused(root, tmp_path):
    """As a folder linked out is: the file's bytes (or a parse error quoting them) never reach a client."""
    model, _ = load_model(resolve_model("default"))
    inner = tmp_path / "inner"
    inner.mkdir()
    outside = tmp_path / "outside"
    make_adapter(outside, seed=3, r=4)
    (inner / "linked").mkdir()
    shutil.copy(outside / "adapter_config.json", inner / "linked" / "adapter_config.json")
    (inner / "linked" / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    reg = AdapterRegistry(model, inner)
    try:
        with pytest.raises(AdapterFileError, match="adapter_model.safetensors links outside the adapters folder"):
            reg.load("linked")
    finally:
        reg.close()


def test_an_unknown_adapter_lists_at_most_twenty_names(tmp_path):
    from rankdial.serve.registry import _listing

    names = [f"ad{k}" for k in range(25)]
    assert _listing(names) == str(names[:20])[:-1] + ", ... 5 more]" and _listing([]) == "none"
    assert _listing(names[:3]) == str(names[:3])
