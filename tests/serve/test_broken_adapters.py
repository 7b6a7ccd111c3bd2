"""Broken adapter folders requested by `model` against the real engine: each a 4xx with a one-line reason,
decided before a stream's 200, and the server goes on serving the others. Also the errors the engine names a
field for (param), and text that is not valid Unicode."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from engine_helpers import make_adapter
from rankdial.errors import AdapterFileError
from rankdial.serve.api import create_app
from rankdial.serve.engine import Engine

BROKEN = ["pickleonly", "corrupt", "notjson", "listcfg", "rzero", "othershape", "badtarget", "nan", "noweights",
          "wideshape", "linkout"]


def _break(root, tmp_path):
    good = root / "good"
    for name in BROKEN[:-2]:
        shutil.copytree(good, root / name)
    cfg = json.loads((good / "adapter_config.json").read_text())
    (root / "pickleonly" / "adapter_model.safetensors").rename(root / "pickleonly" / "adapter_model.bin")
    (root / "corrupt" / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not safetensors")
    (root / "notjson" / "adapter_config.json").write_text("{r: 4,")
    (root / "listcfg" / "adapter_config.json").write_text("[1, 2]")
    (root / "rzero" / "adapter_config.json").write_text(json.dumps(cfg | {"r": 0}))
    tensors = load_file(good / "adapter_model.safetensors")
    save_file({k: torch.zeros(v.shape[0] + 3, v.shape[1]).contiguous() for k, v in tensors.items()},
              root / "othershape" / "adapter_model.safetensors")
    (root / "badtarget" / "adapter_config.json").write_text(json.dumps(cfg | {"target_modules": ["no_such_proj"]}))
    save_file({k: torch.full_like(v, float("nan")) for k, v in tensors.items()}, root / "nan" / "adapter_model.safetensors")
    (root / "noweights" / "adapter_model.safetensors").unlink()
    wide = root / "wideshape"  # all 28 modules' A and B do not multiply
    save_file({k: torch.zeros(v.shape[0] + 3, v.shape[1] + 1).contiguous()
               for k, v in load_file(wide / "adapter_model.safetensors").items()}, wide / "adapter_model.safetensors")
    outside = tmp_path / "outside"
    shutil.copytree(good, outside)
    (root / "linkout").symlink_to(outside)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("broken")
    root = tmp / "adapters"
    make_adapter(root / "good", seed=1, r=4, targets=["q_proj", "v_proj"])
    make_adapter(root / "wideshape", seed=2, r=4)
    _break(root, tmp)
    engine = Engine.from_pretrained("default", str(root), device="cpu", max_new_tokens=64)
    with TestClient(create_app(engine), raise_server_exceptions=False) as c:
        yield c, engine, root


def _error(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == status and "\n" not in err["message"] and "Traceback" not in err["message"]
    return err


@pytest.mark.slow
@pytest.mark.parametrize("name", BROKEN)
def test_a_broken_adapter_folder_is_a_4xx_with_its_reason_and_the_others_still_serve(served, name):
    c, engine, _ = served
    for route, extra in (("/v1/completions", {"prompt": "In the beginning"}),
                         ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        for stream in (False, True):
            r = c.post(route, json={"model": name, "max_tokens": 3, "stream": stream} | extra)
            err = _error(r, 422)
            assert err["param"] == "model" and name in err["message"] and "cannot be served" in err["message"]
    assert c.post("/v1/completions", json={"model": "good", "prompt": "In the", "max_tokens": 3}).status_code == 200
    cards = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
    if name != "linkout":  # a folder that failed is listed with why, until its files change
        assert name in cards and cards[name]["loaded"] is False and "\n" not in cards[name]["error"]


@pytest.mark.slow
def test_a_remembered_failure_is_forgotten_once_the_files_change(served):
    c, engine, root = served
    assert _error(c.post("/v1/completions", json={"model": "noweights", "prompt": "x", "max_tokens": 2}), 422)
    shutil.copy(root / "good" / "adapter_model.safetensors", root / "noweights" / "adapter_model.safetensors")
    assert c.post("/v1/completions", json={"model": "noweights", "prompt": "x", "max_tokens": 2}).status_code == 200
    assert "error" not in {m["id"]: m for m in c.get("/v1/models").json()["data"]}["noweights"]


@pytest.mark.slow
def test_engine_refusals_name_their_field(served):
    c, engine, _ = served
    cases = [({"prompt": "x", "max_tokens": 65}, "max_tokens"), ({"prompt": [1, 10 ** 6]}, "prompt"),
             ({"prompt": "word " * 600}, "prompt"), ({"prompt": [5] * 500, "max_tokens": 60}, "max_tokens")]
    for body, param in cases:
        assert _error(c.post("/v1/completions", json={"model": "good"} | body), 400)["param"] == param, body
    long_chat = {"model": "good", "messages": [{"role": "user", "content": "word " * 600}]}
    assert _error(c.post("/v1/chat/completions", json=long_chat), 400)["param"] == "messages"


@pytest.mark.slow
def test_a_lone_surrogate_is_a_422_naming_the_field(served):
    c, engine, _ = served
    raw = b'{"model": "good", "prompt": "a \\ud800 b"}'
    err = _error(c.post("/v1/completions", content=raw, headers={"content-type": "application/json"}), 422)
    assert err["param"] == "prompt" and "prompt is not valid Unicode" in err["message"]
    raw = b'{"model": "good", "messages": [{"role": "user", "content": "\\ud800"}]}'
    err = _error(c.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"}), 422)
    assert err["param"] == "messages" and "content is not valid Unicode" in err["message"]
    with pytest.raises(Exception, match="not valid Unicode"):  # the engine refuses it too, called directly
        engine.submit("\ud800", None)


@pytest.mark.slow
def test_no_client_sees_a_server_absolute_path_and_a_long_list_is_cut(served):
    """Issue 18: a 422 for a corrupt adapter_config.json, /v1/models' "error" fields and a 400 for a path outside
    the adapters folder named the server's absolute folder; an adapter whose 28 modules have wrong shapes listed
    them all (5 KB). Clients see names relative to the adapters folder; long lists are cut to a few."""
    c, engine, root = served
    server_path = str(root.parent)
    for name in [n for n in BROKEN if n != "noweights"]:  # a test above repairs noweights
        r = c.post("/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 2})
        message = _error(r, 422)["message"]
        assert server_path not in message and len(message) < 700, (name, message)
    assert "notjson" in c.post("/v1/completions", json={"model": "notjson", "prompt": "x"}).json()["error"]["message"]
    wide = c.post("/v1/completions", json={"model": "wideshape", "prompt": "x"}).json()["error"]["message"]
    assert "and 25 more" in wide
    listing = c.get("/v1/models").text
    assert "notjson" in listing and server_path not in listing
    for path in ("../outside", "good/../../outside", "linkout"):
        message = _error(c.post("/v1/adapters", json={"name": "x1", "path": path}), 400)["message"]
        assert "outside the adapters folder" in message and server_path not in message, message


def test_broken_folders_are_found_at_start_up_and_listed_with_their_reason(tmp_path):
    """A folder whose files, config or safetensors header are broken is said at start-up (check_folders, which
    `rankdial serve` turns into one warning line) and /v1/models' card carries its reason before any request
    asks for it (it looked loadable until the first request; found by a hostile pass). No tensor is read: NaN
    weights or shapes that do not fit the base are still found at the first load."""
    from rankdial.models import load_model, resolve_model
    from rankdial.serve import AdapterRegistry

    root = tmp_path / "adapters"
    make_adapter(root / "good", seed=1, r=4, targets=["q_proj", "v_proj"])
    make_adapter(root / "wideshape", seed=2, r=4)
    _break(root, tmp_path)
    registry = AdapterRegistry(load_model(resolve_model("default"))[0], root)
    try:
        failed = registry.check_folders()
        assert {"pickleonly", "corrupt", "notjson", "listcfg", "noweights", "linkout"} <= set(failed)
        assert not {"good", "nan", "othershape"} & set(failed) and registry.loaded() == []  # nothing loaded
        cards = {info.name: error for info, error in registry.listing()}
        assert cards["good"] is None and "pickle" in cards["pickleonly"] and str(root) not in cards["corrupt"]
        with pytest.raises(AdapterFileError, match="adapter_config.json"):
            registry.load("notjson")  # refused at once, from the remembered reason
    finally:
        registry.close()
