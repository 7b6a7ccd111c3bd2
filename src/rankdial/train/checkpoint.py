"""Training checkpoints: written atomically, verified by a manifest, the newest good one found on resume.

A checkpoint folder `checkpoints/step-000050/` of a DDP or single-process run holds the trainable tensors (and, for LoRA, a PEFT adapter
folder `adapter/` usable on its own), the optimizer and scheduler states, the RNG states and the data
position. It is built beside its final name and swapped in whole by rankdial.atomic.atomic_dir (marker kind
"train-checkpoint"); `manifest.json` (size and SHA-256 of every file) is written last inside it, so a folder
without a matching manifest is incomplete or corrupt and is passed over for the one before it.

A run with sharding="fsdp" writes the trainable tensors and AdamW's moments with torch.distributed.checkpoint
instead (`dcp/`: one file per process plus DCP's `.metadata`), each process writing its own shards into the
same temporary folder; `training_state.pt` (scheduler, optimizer hyperparameters and step counts),
`rng-rank<R>.pt` (each process's RNG states), `state.json` and the gathered `adapter/` complete it, and the main
process seals it with the manifest and swaps it in as above. DCP reshards on load, so such a checkpoint
resumes on any number of processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..atomic import MARKER, OwnFiles, atomic_dir

KIND = "train-checkpoint"  # the marker kind of a checkpoint folder
MANIFEST = "manifest.json"
PREFIX = "step-"


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (MANIFEST, MARKER))


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# A step folder written before rankdial's marker: nothing but a checkpoint's own files (rankdial.atomic.OwnFiles).
_is_checkpoint_folder = OwnFiles("state.json", {"trainable.safetensors", "training_state.pt", "adapter", MANIFEST})


def write_checkpoint(root: Path, step: int, trainable: dict[str, torch.Tensor], optimizer, scheduler,
                     state: dict, save_adapter_fn=None) -> Path:
    """Write checkpoint `step` under root/checkpoints atomically (rankdial.atomic.atomic_dir); returns its folder."""
    final = root / "checkpoints" / f"{PREFIX}{step:06d}"
    with atomic_dir(final, kind=KIND, legacy=_is_checkpoint_folder, what="checkpoint folder") as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in trainable.items()}, tmp / "trainable.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
                   tmp / "training_state.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2, allow_nan=False) + "\n")
        if save_adapter_fn is not None:
            save_adapter_fn(tmp / "adapter")
        manifest = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in _files(tmp)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")  # last: it vouches for the rest
    return final


def verify(folder: Path) -> str | None:
    """Why `folder` is not a complete checkpoint, or None when every file matches its manifest."""
    mf = folder / MANIFEST
    if not mf.is_file():
        return "no manifest.json (the write did not finish)"
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "manifest.json is not valid JSON"
    tensors = "dcp/.metadata" if "dcp/.metadata" in manifest else "trainable.safetensors"
    for name in (tensors, "training_state.pt", "state.json"):
        if name not in manifest:
            return f"manifest.json does not list {name}"
    for name, meta in manifest.items():
        p = folder / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != meta["bytes"]:
            return f"{name} has {p.stat().st_size} bytes, the manifest says {meta['bytes']}"
        if _sha256(p) != meta["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest"
    return None


def list_checkpoints(root: Path) -> list[Path]:
    ckpts = root / "checkpoints"
    if not ckpts.is_dir():
        return []
    found = []
    for p in ckpts.iterdir():
        if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit():
            found.append(p)
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_good(root: Path, log=print) -> Checkpoint | None:
    """The newest checkpoint that verifies; each bad one passed over is reported through `log`."""
    for folder in reversed(list_checkpoints(root)):
        problem = verify(folder)
        if problem:
            log(f"checkpoint {folder} is incomplete or corrupt ({problem}); trying the one before it")
            continue
        state = json.loads((folder / "state.json").read_text())
        return Checkpoint(folder, int(state["step"]), state)
    return None


def load_into(ckpt: Checkpoint, named_trainable: dict[str, torch.nn.Parameter], optimizer, scheduler) -> None:
    """Restore trainable tensors, optimizer, scheduler and RNG states from `ckpt`."""
    tensors = load_file(ckpt.path / "trainable.safetensors")
    if set(tensors) != set(named_trainable):
        missing = sorted(set(named_trainable) - set(tensors))[:3]
        extra = sorted(set(tensors) - set(named_trainable))[:3]
        raise ValueError(f"checkpoint {ckpt.path} does not fit this model (missing {missing}, unexpected {extra}); "
                         "resume with the same model, method and adapter settings")
    with torch.no_grad():
        for name, p in named_trainable.items():
            p.copy_(tensors[name].to(p.device, p.dtype))
    blob = torch.load(ckpt.path / "training_state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(blob["rng"])


def _sharded_state(named: dict[str, torch.Tensor], optimizer) -> dict[str, torch.Tensor]:
    """What DCP writes and reads in place: each trainable tensor and its AdamW moments (DTensors under FSDP)."""
    out = {}
    for name, p in named.items():
        out[f"param/{name}"] = p.detach()
        for key in ("exp_avg", "exp_avg_sq"):
            if key in optimizer.state.get(p, {}):
                out[f"{key}/{name}"] = optimizer.state[p][key]
    return out


def write_sharded_checkpoint(root: Path, step: int, named: dict[str, torch.Tensor], optimizer, scheduler,
                             state: dict, dist_info, save_adapter_fn=None) -> Path:
    """Checkpoint `step` of a sharding="fsdp" run (see the module doc). Every process must call it; returns
    the folder once it is in place. save_adapter_fn(folder), if given, is called on every process (it gathers;
    the main process writes)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    final = root / "checkpoints" / f"{PREFIX}{step:06d}"
    world = dist.is_available() and dist.is_initialized()
    with (atomic_dir(final, kind=KIND, legacy=_is_checkpoint_folder, what="checkpoint folder")
          if dist_info.main else contextlib.nullcontext()) as tmp:
        box = [str(tmp) if dist_info.main else None]
        if world:
            dist.broadcast_object_list(box, src=0)
        tmp = Path(box[0])
        dcp.save(_sharded_state(named, optimizer), checkpoint_id=tmp / "dcp")
        torch.save(rng_state(), tmp / f"rng-rank{dist_info.rank}.pt")
        if save_adapter_fn is not None:
            save_adapter_fn(tmp / "adapter")
        if dist_info.main:
            steps = {name: optimizer.state[p]["step"] for name, p in named.items() if "step" in optimizer.state.get(p, {})}
            groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
            torch.save({"scheduler": scheduler.state_dict(), "param_groups": groups, "steps": steps},
                       tmp / "training_state.pt")
            (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2, allow_nan=False) + "\n")
        if world:
            dist.barrier()  # every process's files are written before the manifest vouches for them
        if dist_info.main:
            manifest = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in _files(tmp)}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if world:
        dist.barrier()  # in place before anyone goes on (and prunes, or is killed)
    return final


def load_sharded_into(ckpt: Checkpoint, named: dict[str, torch.nn.Parameter], optimizer, scheduler, rank: int) -> None:
    """Restore a sharded checkpoint into this run's tensors, resharded by DCP to this run's processes (every
    process must call it). Raises ValueError when the checkpoint's tensors are not this run's."""
    import torch.distributed.checkpoint as dcp

    blob = torch.load(ckpt.path / "training_state.pt", map_location="cpu", weights_only=True)
    if set(blob["steps"]) != set(named):
        missing = sorted(set(named) - set(blob["steps"]))[:3]
        extra = sorted(set(blob["steps"]) - set(named))[:3]
        raise ValueError(f"checkpoint {ckpt.path} does not fit this model (missing {missing}, unexpected {extra}); "
                         "resume with the same model, method and adapter settings")
    for name, p in named.items():  # AdamW's state as its first step makes it, to be filled in place
        optimizer.state[p] = {"step": blob["steps"][name].clone().to(p.device),
                              "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
    dcp.load(_sharded_state(named, optimizer), checkpoint_id=ckpt.path / "dcp")
    for group, saved in zip(optimizer.param_groups, blob["param_groups"]):
        group.update(saved)
    scheduler.load_state_dict(blob["scheduler"])
    own = ckpt.path / f"rng-rank{rank}.pt"
    set_rng_state(torch.load(own if own.is_file() else ckpt.path / "rng-rank0.pt", weights_only=True))


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints."""
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
