"""The training loop as named stages, read top to bottom: setup, then step / evaluate / save, then finish.

    run = setup(cfg)                 # check everything, load model and data, build the optimizer, resume
    with output_folder(run):         # output_dir itself, or (--overwrite) a new folder swapped in at the end
        fit(run)                     # step() each optimizer step; evaluate() and save() on their schedules
        finish(run)                  # the adapter (or model), loss.png, summary.json last

Exactness rules that the resume and DDP tests rely on:
- The data order is a pure function of (seed, epoch): epoch e visits the examples in
  random.Random(seed + e)'s shuffle. Step s takes the global samples [s*G, (s+1)*G), G = batch_size *
  grad_accum * world_size, so the data position is just the step number.
- The loss of a step is (sum of token losses over the global batch) / (number of target tokens in the global
  batch), whatever the split into processes and micro-batches; so a 2-process run follows a 1-process run with
  the same global batch.
- A checkpoint holds everything else that changes: trainable tensors, optimizer, scheduler, RNG states.

Under torchrun, sharding="ddp" (the default) keeps a whole model in each process (DistributedDataParallel);
sharding="fsdp" builds the model on the meta device and loads it straight into FSDP2 shards, one decoder layer
at a time (distributed.load_into_shards): parameters, gradients and AdamW's moments are DTensor shards, the
gradient norm is the global one, checkpoints are torch.distributed.checkpoint's (every process writes its
shards), and the finished adapter (or model) is gathered to the main process, which writes the run folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..atomic import MARKER, atomic_dir, check_target, note_written, write_json
from ..config import init_mutates_base
from ..errors import RankdialError, TrainingError, TrainingInterrupted
from ..memory import MIB, estimate_memory, peak_memory_mb, reset_peak_memory
from . import checkpoint as ckpt_io
from .config import TrainConfig, make_config
from .artefacts import (CONFIG_NAME, DONE_MARKER, LEGACY_RUN_NAMES, METRICS_NAME, PLOT_NAME, RUN_KIND, append_metrics,
                        is_legacy_run, plot_losses, read_history, save_final_model)
from .data import Dataset, check_data_file, collate
from .distributed import (Dist, all_sum, barrier, full_value, init_distributed, load_into_shards, meta_model,
                          pick_run_device, shard_model, whole_parameters)
from .pieces import Sampler, evaluate, load_data, make_optimizer, prepare_model, token_loss_sum


__all__ = ["train", "setup", "output_folder", "fit", "step", "evaluate_now", "save", "finish", "result", "Run", "TrainResult",
           "TrainingError", "token_loss_sum", "prepare_model", "plot_losses", "summary_text", "peak_memory_mb"]


@dataclass
class TrainResult:
    output_dir: Path
    method: str
    steps: int
    losses: list[float]
    eval_losses: list[tuple[int, float]]
    trainable: int
    total: int
    seconds: float
    tokens_per_second: float
    peak_memory_mb: float
    resumed_from: int | None = None
    data_report: list[str] = field(default_factory=list)

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / max(1, self.total)


@dataclass
class Run:
    """What the stages share. `out` is the folder the user named; `work` is where files go now (out itself,
    or for --overwrite a new folder beside it that replaces out when the run has finished)."""

    cfg: TrainConfig
    dist: Dist
    device: torch.device
    out: Path
    mode: str  # "new", "resume", "restart" (an unfinished run without checkpoints) or "replace" (--overwrite)
    base_path: Path
    model: Any
    tokenizer: Any
    is_lora: bool
    named: dict[str, torch.nn.Parameter]
    train_data: Dataset
    eval_data: Dataset | None
    sampler: Sampler
    optimizer: Any
    scheduler: Any
    total_steps: int
    trainable: int
    total_params: int
    say: Callable
    data_report: list[str] = field(default_factory=list)
    fsdp: bool = False  # the model is sharded with FSDP2 (sharding="fsdp" and two or more processes)
    work: Path | None = None
    start_step: int = 0
    done: int = 0  # optimizer steps finished
    resumed_from: int | None = None
    last_checkpoint: ckpt_io.Checkpoint | None = None
    losses: list[float] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    tokens_done: int = 0
    t_start: float = 0.0  # when fit() began: seconds count the loop (steps, evaluations, checkpoints), not loading
    t_loop: float = 0.0
    seconds_before: float = 0.0  # a resumed run's seconds and peak up to its checkpoint
    peak_before: float = 0.0

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.dist.world

    @property
    def autocast(self):
        if self.cfg.bf16:
            return lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext


# ---------------------------------------------------------------------------------------------------- train

def train(config: Any = None, *, resume: bool = False, overwrite: bool = False, log=None,
          **overrides: Any) -> TrainResult:
    """Fine-tune a model as `config` says (a TrainConfig, a dict, or a .toml/.yaml path; keyword overrides win).

    Writes output_dir: the PEFT adapter (LoRA/QLoRA) or the full model folder (full), rankdial_train.json,
    metrics.jsonl, loss.png and summary.json (written last: a folder without it is not a finished run).
    With overwrite=True a finished run is replaced only once the new one has finished; until then (and for
    good if the new run fails or is interrupted) the old one stays as it was. Ctrl-C raises
    TrainingInterrupted, whose message says where it stopped and how to resume.
    """
    cfg = make_config(config, **overrides)  # every value checked (LoRA's too) before anything loads
    run = None
    try:
        with _process_recompile_limit(cfg.compile):
            run = setup(cfg, resume=resume, overwrite=overwrite, log=log)
            with output_folder(run):
                fit(run)
                result = finish(run)
    except KeyboardInterrupt:
        raise interrupted(run) from None
    barrier(run.dist)
    return result


_limit_lock = threading.Lock()
_limit_holders: list = [0, None]  # compile runs in progress in this process, dynamo's recompile limit before them


@contextlib.contextmanager
def _process_recompile_limit(compiling: bool):
    """compile = true raises dynamo's (process-wide) recompile limit for the run (compile_layers); the process's own
    comes back when the last of the compile runs in progress ends, so runs in threads never lower it under each
    other, and it is never left raised."""
    if not compiling:
        yield
        return
    with _limit_lock:
        if _limit_holders[0] == 0:
            _limit_holders[1] = torch._dynamo.config.recompile_limit
        _limit_holders[0] += 1
    try:
        yield
    finally:
        with _limit_lock:
            _limit_holders[0] -= 1
            if _limit_holders[0] == 0:
                torch._dynamo.config.recompile_limit = _limit_holders[1]


# ---------------------------------------------------------------------------------------------------- setup

def setup(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, log=None, model=None,
          prepare=None) -> Run:
    """Everything before the first step; nothing is written. `model` = (model, tokenizer) skips loading it and
    `prepare(model, cfg, base_path)` replaces prepare_model (the seams the benchmark uses)."""
    from ..models import load_model, load_model_nf4, resolve_model
    from ..models.loading import load_tokenizer

    dist_info = init_distributed(cfg.device)
    device = pick_run_device(cfg.device, dist_info)
    reset_peak_memory(device)  # the run's own peak, not the process's so far (a sweep trains several runs)
    say = (log or print) if dist_info.main else (lambda *a, **k: None)
    base_path = resolve_model(cfg.model)
    check_data_files(cfg)
    mode = plan_output(cfg, resume, overwrite, inputs=[cfg.data, cfg.eval_data or None, base_path])
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    fsdp = _fsdp(cfg, dist_info, say)
    # FSDP builds the model on the meta device and loads it straight into shards (load_into_shards), so no
    # process ever holds the whole model; a model passed in, a custom `prepare`, an adapter whose start reads the
    # base (_reads_base) or weights not in safetensors take the ordinary load, then shard_model.
    skeleton = (meta_model(base_path) if fsdp and model is None and prepare is None
                and not _reads_base(cfg) else None)
    if skeleton is not None:
        model = (skeleton, load_tokenizer(base_path))
    elif model is None:  # QLoRA quantizes while loading, so the full-precision model is never in memory at once
        nf4 = cfg.method == "qlora" and cfg.lora.init_lora_weights != "loftq"  # LoftQ needs the dense weights
        model = (load_model_nf4 if nf4 else load_model)(base_path, device)
    net, tokenizer = model
    train_data, eval_data, data_report = load_data(cfg, tokenizer)
    for line in data_report:
        say(f"data  {line}")
    # On the meta device QLoRA's quantization waits for the weights (load_into_shards); the adapters are the same.
    lora = (prepare or prepare_model)(net, cfg if skeleton is None or cfg.method != "qlora"
                                      else dataclasses.replace(cfg, method="lora"), base_path)
    trainable, total = _trainable(net, cfg, base_path, say, dist_info.world if fsdp else 1)
    fsdp_options = dict(bf16=cfg.bf16, reshard_after_forward=cfg.fsdp_reshard_after_forward,
                        cpu_offload=cfg.fsdp_cpu_offload, say=say)
    if skeleton is not None:
        load_into_shards(net, base_path, dist_info, device, qlora=cfg.method == "qlora", **fsdp_options)
    elif fsdp:
        shard_model(net, dist_info, device, **fsdp_options)
    if cfg.compile:
        compile_layers(net, say, fsdp)
        warm_up_compiled(net, device, cfg, say)
    named = {n: p for n, p in net.named_parameters() if p.requires_grad}
    total_steps = cfg.steps or max(1, math.ceil(cfg.epochs * len(train_data.examples)
                                                / (cfg.batch_size * cfg.grad_accum * dist_info.world)))
    optimizer, scheduler = make_optimizer(named, cfg, total_steps)
    run = Run(cfg=cfg, dist=dist_info, device=device, out=Path(cfg.output_dir), mode=mode, base_path=base_path,
              model=net, tokenizer=tokenizer, is_lora=lora is not None, named=named, train_data=train_data,
              eval_data=eval_data, sampler=Sampler(len(train_data.examples), cfg.seed), optimizer=optimizer,
              scheduler=scheduler, total_steps=total_steps, trainable=trainable, total_params=total, say=say,
              data_report=data_report, fsdp=fsdp)
    if resume:
        resume_from_checkpoint(run)
    return run


def check_data_files(cfg: TrainConfig) -> None:
    """Fail fast, before the model loads: each data file named must be a file."""
    for name in ("data", "eval_data"):
        if getattr(cfg, name):
            check_data_file(getattr(cfg, name), f"{name} file")


def plan_output(cfg: TrainConfig, resume: bool, overwrite: bool, inputs: list) -> str:
    """How this run may use output_dir, decided before anything loads or is written (see Run.mode).

    Only a folder rankdial marked as a training run (or, from before markers, one holding rankdial_train.json)
    is ever written into or replaced; never a folder that is or holds one of the run's inputs.
    """
    out = Path(cfg.output_dir)
    if resume and overwrite:
        raise TrainingError("--resume continues an unfinished run in output_dir and --overwrite replaces a run "
                            "with a new one; pass one of them")
    check_target(out, RUN_KIND, inputs, legacy=is_legacy_run, what="output_dir")
    if not out.is_dir() or not any(out.iterdir()):
        return "new"
    if overwrite:
        return "replace"
    if (out / DONE_MARKER).exists():
        raise TrainingError(f"output_dir {out} already holds a finished run; choose another output_dir, or pass "
                            "--overwrite to replace it (the old run is kept until the new one has finished)")
    if resume:
        return "resume"
    if ckpt_io.list_checkpoints(out):
        raise TrainingError(f"output_dir {out} holds checkpoints of an unfinished run; pass --resume to continue "
                            "it, --overwrite to replace it, or choose another output_dir")
    return "restart"


def _reads_base(cfg: TrainConfig) -> bool:
    """Whether the adapter's start is made from the base's values, so it cannot be drawn on the meta device
    (distributed._lora_init_values): modules_to_save (copies of base modules), PiSSA/OLoRA/LoftQ (A, B and the
    residual from W₀), DoRA (m = ‖W₀ + s·BA‖ per row) and expert parameters (lora/param.py)."""
    lora = cfg.lora
    return cfg.method != "full" and bool(lora.modules_to_save or init_mutates_base(lora.init_lora_weights)
                                         or lora.use_dora or lora.target_parameters)


def _fsdp(cfg: TrainConfig, dist_info: Dist, say) -> bool:
    """Whether this run shards with FSDP: sharding="fsdp" under torchrun with two or more processes."""
    if cfg.sharding != "fsdp":
        return False
    if cfg.fsdp_cpu_offload and not torch.cuda.is_available():
        raise TrainingError("fsdp_cpu_offload=true keeps FSDP's shards in CPU memory between uses on a GPU run; "
                            "this machine has no CUDA device, so there is nothing to offload: drop the option")
    if dist_info.world == 1:
        say("sharding=fsdp with one process: nothing to shard, training as a single process (launch with "
            "torchrun --nproc_per_node N to shard over N processes)")
        return False
    return True


def compile_layers(model, say=print, fsdp: bool = False) -> int:
    """compile = true: each decoder layer's forward through torch.compile (inductor), in place (nn.Module.compile),
    so the loss (the head's hook, the chunked cross-entropy) stays eager; the layers compile during the first step.
    Returns how many layers. A model without decoder layers (model.model.layers), or an FSDP run, is refused."""
    from ..errors import ConfigError

    if fsdp:
        raise ConfigError("compile = true is not supported with sharding = \"fsdp\" yet; set compile = false or "
                          "sharding = \"ddp\"")
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise ConfigError(f"compile = true needs a model with decoder layers (model.model.layers); "
                          f"{type(model).__name__} has none; set compile = false")
    # every layer shares one code object; warm_up_compiled makes 8 graphs of it and evaluation adds its own
    # (train() puts the process's own limit back when the last compile run in progress ends)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)
    for layer in layers:
        layer.compile(dynamic=True)  # one graph for every sequence length (no recompile when the length changes)
    say(f"compile  {len(layers)} decoder layers through torch.compile (inductor, dynamic shapes)")
    return len(layers)


def warm_up_compiled(model, device, cfg: TrainConfig, say=print) -> float:
    """Compile the graphs a training step needs now, before the first step, instead of at whichever later step first
    needs one (~10 s each on the default model, more on a 0.5B one; measured in a run, that stall lands in its
    tokens/s). A step's layers take one of several graphs: the first layer's input needs no gradient while the
    others' do; transformers hands the layers an attention mask only when the batch has padding (a packed batch
    has none); and a width equal to a static size of the model (max_length 64 = head_dim 64) is specialised, any
    other width shares one dynamic graph. So: forward and backward of four synthetic batch_size-row batches,
    max_length wide and an odd width, each without and with padding (8 graphs; compile_layers raises dynamo's
    recompile limit from 8 to 16 so that evaluation's no-grad graphs still compile). The layers also choose
    their form from the row count (rankdial.memory.merge_first), so full-size batches. Gradients are dropped and the RNG
    state restored: the run is the same as without it. Returns the seconds taken."""
    t0 = time.perf_counter()
    vocab = model.get_input_embeddings().num_embeddings
    rows, width = max(2, cfg.batch_size), max(4, cfg.max_length)
    odd = width - 1 if (width - 1) % 2 else width - 2
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if cfg.bf16 else contextlib.nullcontext
    was_training = model.training
    model.train()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for w, padded in ((width, False), (width, True), (odd, False), (odd, True)):
            ids = torch.randint(0, vocab, (rows, w), generator=torch.Generator().manual_seed(w)).to(device)
            mask = torch.ones_like(ids)
            if padded:
                mask[1:, w // 2:] = 0
            batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.where(mask.bool(), ids, -100)}
            token_loss_sum(model, batch, autocast, cfg.loss_chunk).backward()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    seconds = time.perf_counter() - t0
    say(f"compile  warm-up (the graphs a step needs) took {seconds:.1f} s")
    return seconds


def _trainable(model, cfg: TrainConfig, base_path: Path, say, processes: int = 1) -> tuple[int, int]:
    from ..lora import trainable_parameters

    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "config"):
        model.config.use_cache = False
    report = trainable_parameters(model)
    say(report.summary())
    say(_memory_plan_line(cfg, base_path, processes))
    return report.trainable, report.total


def _apply_lr(run: Run, step: int) -> None:
    """A resumed scheduler carries the lr it was saved with; the config's lr wins (e.g. lowered after a NaN)."""
    old = run.scheduler.base_lrs[0]
    if old == run.cfg.lr:
        return
    run.scheduler.base_lrs = [run.cfg.lr for _ in run.scheduler.base_lrs]
    factor = run.scheduler.lr_lambdas[0](step)
    for group in run.optimizer.param_groups:
        group["lr"] = run.cfg.lr * factor
    run.scheduler._last_lr = [group["lr"] for group in run.optimizer.param_groups]
    run.say(f"--resume: lr {old:g} -> {run.cfg.lr:g} (the config's), from step {step}")


def _adapter_writer(model):
    from ..adapters import save_adapter

    return lambda folder: save_adapter(model, folder)


def _sharded_adapter_writer(run: Run):
    """save_adapter for every process of an FSDP run: all gather the adapter, the main process writes it."""
    from ..adapters import save_adapter

    def write(folder: Path) -> None:
        with whole_parameters(run.model, run.dist, trainable_only=True) if run.fsdp else contextlib.nullcontext():
            if run.dist.main:
                save_adapter(run.model, folder)
    return write


def _memory_plan_line(cfg: TrainConfig, base_path: Path, processes: int = 1) -> str:
    """One line of rankdial.memory's plan for this run (Llama-shaped models; others get a short note)."""
    targets = cfg.lora.target_modules if cfg.method != "full" else "all-linear"
    try:
        plan = estimate_memory(base_path, method=cfg.method, rank=cfg.lora.r, targets=targets,  # weights load fp32
                               batch_size=cfg.batch_size, seq_len=cfg.max_length, dtype="fp32",
                               gradient_checkpointing=cfg.gradient_checkpointing, processes=processes,
                               sharding="fsdp" if processes > 1 else "ddp", optimizer=cfg.optimizer,
                               loss_chunk=cfg.loss_chunk,  # autocast and dropout keep LoRA's unmerged form
                               merged_weight=not cfg.bf16 and cfg.lora.lora_dropout == 0)
    except RankdialError as err:  # a model that is not Llama-shaped, or targets given as a pattern
        return f"memory plan: not available for this model/targets ({_first_line(err)})"
    terms = ", ".join(f"{k} {v / MIB:.0f}" for k, v in plan.terms().items() if v)
    per = f" per process ({processes}, fsdp)" if processes > 1 else ""
    return f"memory plan (rankdial.memory): peak ~{plan.total_bytes / MIB:.0f} MiB{per} ({terms} MiB)"


def _first_line(err: BaseException) -> str:
    return str(err).splitlines()[0][:160]


def resume_from_checkpoint(run: Run) -> None:
    """Load the newest good checkpoint of output_dir into the model, optimizer, scheduler and RNGs."""
    found = ckpt_io.latest_good(run.out, log=run.say) if run.mode == "resume" else None
    if found is None:
        run.say(f"--resume: no usable checkpoint in {run.out}; starting from step 0")
        return
    saved = found.state
    _check_sharding(run, found)
    if saved.get("global_batch") != run.global_batch or saved.get("total_steps") != run.total_steps:
        raise TrainingError(f"checkpoint {found.path} was written with global batch {saved.get('global_batch')} "
                            f"and {saved.get('total_steps')} steps; this run has {run.global_batch} and "
                            f"{run.total_steps}. Resume with the same config and number of processes")
    if saved.get("optimizer", "adamw") != run.cfg.optimizer:  # the states of one do not fit the other
        raise TrainingError(f"checkpoint {found.path} was written with optimizer={saved.get('optimizer', 'adamw')!r}; "
                            f"this run has {run.cfg.optimizer!r}. Resume with the optimizer it was written with")
    for key, value in _base_settings(run.cfg).items():  # checkpoints from before these were recorded pass
        if key in saved and saved[key] != value:
            raise TrainingError(f"checkpoint {found.path} was written with {key}={saved[key]!r}; this run has "
                                f"{key}={value!r}. Resume with the {key} it was written with (the adapter's A "
                                "and B only fit the base they trained against)")
    try:
        if run.cfg.sharding == "fsdp":
            ckpt_io.load_sharded_into(found, run.named, run.optimizer, run.scheduler, run.dist.rank)
        else:
            ckpt_io.load_into(found, run.named, run.optimizer, run.scheduler)
    except (ValueError, RuntimeError) as err:  # RuntimeError: a tensor of another shape (another r)
        raise TrainingError(f"checkpoint {found.path} does not fit this run ({_first_line(err)}); resume with the "
                            "config it was written with") from None
    _apply_lr(run, found.step)
    run.start_step = run.done = run.resumed_from = found.step
    run.seconds_before, run.peak_before = saved.get("seconds", 0.0), saved.get("peak_memory_mb", 0.0)
    run.last_checkpoint = found
    run.say(f"resumed from {found.path} (step {found.step})")


def _base_settings(cfg: TrainConfig) -> dict:
    """The settings that change what the checkpoint's tensors apply to while keeping their names and shapes:
    qlora quantizes the base, PiSSA/OLoRA/LoftQ leave a residual in it (so a resume changing one would load
    silently and train another model); use_dora adds magnitudes."""
    return {"method": cfg.method, "init_lora_weights": cfg.lora.init_lora_weights, "use_dora": cfg.lora.use_dora,
            "loftq_config": dict(cfg.lora.loftq_config or {})}


def _check_sharding(run: Run, found: ckpt_io.Checkpoint) -> None:
    """A checkpoint resumes under the sharding that wrote it; an FSDP one on any number of processes (DCP
    reshards it), said in one line when the number changed."""
    saved = found.state.get("sharding", "ddp")  # checkpoints from before sharding existed are DDP's
    world = found.state.get("world_size")
    if saved != run.cfg.sharding:
        raise TrainingError(f"checkpoint {found.path} was written with sharding={saved} on {world} process(es); "
                            f"this run has sharding={run.cfg.sharding} on {run.dist.world}. Resume with "
                            f"--sharding {saved} (the two store their tensors differently)")
    if saved == "fsdp" and world != run.dist.world:
        run.say(f"--resume: checkpoint {found.path} was written by {world} process(es); resharding it to "
                f"{run.dist.world}")


@contextlib.contextmanager
def output_folder(run: Run):
    """Set run.work for the block: output_dir itself, or for "replace" a new folder beside it that is swapped
    in when the block ends without error (rankdial.atomic.atomic_dir; on error or Ctrl-C it is removed)."""
    if run.mode == "replace" and run.dist.main:
        inputs = [run.cfg.data, run.cfg.eval_data or None, run.base_path]
        with atomic_dir(run.out, RUN_KIND, inputs, legacy=is_legacy_run, what="output_dir") as tmp:
            run.work = tmp
            yield run.work
        run.work = run.out
        return
    run.work = run.out
    if run.dist.main:
        run.out.mkdir(parents=True, exist_ok=True)
        if not (run.out / MARKER).exists():
            # a run from before markers (recognised by plan_output): only rankdial's own run names count as written
            # by rankdial, so a later --overwrite still refuses while the folder holds anything else of the user's
            ours = sorted(p.name for p in run.out.iterdir() if p.name in LEGACY_RUN_NAMES)
            write_json(run.out / MARKER, {"kind": RUN_KIND, "written_by": "rankdial", "files": ours})
    yield run.work


# ------------------------------------------------------------------------------------------------ the loop

def fit(run: Run, on_step: Callable[[Run], None] | None = None) -> None:
    """The config and metrics files, the evaluation at step 0, then step/evaluate/save up to total_steps.
    on_step(run), if given, is called after each step and its evaluation (the playground streams from it; an
    exception it raises stops the run there)."""
    cfg = run.cfg
    run.t_start = time.perf_counter()
    if run.dist.main:
        write_json(run.work / CONFIG_NAME, {**cfg.to_dict(), "base_model": str(run.base_path),
                                            "world_size": run.dist.world})
        run.losses, run.eval_losses = read_history(run.work / METRICS_NAME, run.start_step)
        note_written(run.work, [CONFIG_NAME, METRICS_NAME])
    barrier(run.dist)
    if run.eval_data is not None and run.start_step == 0:
        evaluate_now(run, 0)
    bar = _progress_bar(run)
    model = _wrap_ddp(run)
    model.train()
    run.t_loop = time.perf_counter()
    for s in range(run.start_step, run.total_steps):
        loss, lr = step(run, model, s)
        run.done = s + 1
        _report_step(run, bar, loss, lr)
        if run.eval_data is not None and cfg.eval_every and (run.done % cfg.eval_every == 0
                                                             or run.done == run.total_steps):
            evaluate_now(run, run.done, bar)
        if cfg.save_every and run.done % cfg.save_every == 0 and run.done < run.total_steps:
            save(run)
        if on_step is not None:
            on_step(run)
    bar.close()
    if run.eval_data is not None and not cfg.eval_every:
        evaluate_now(run, run.total_steps)


def step(run: Run, model, s: int) -> tuple[float, float]:
    """Optimizer step s (0-based): accumulate the global batch's gradient, check the loss, clip, step.
    Returns (loss, learning rate used)."""
    micro, targets = _micro_batches(run, s)
    loss = 0.0
    for m, batch in enumerate(micro):
        batch = {k: v.to(run.device) for k, v in batch.items()}
        last = m == len(micro) - 1
        # DDP: one all-reduce per step, at the last micro-batch. FSDP reduce-scatters each micro-batch's
        # gradient into the shards (skipping it would hold every layer's whole gradient until the last one).
        with model.no_sync() if (run.dist.world > 1 and not last and not run.fsdp) else contextlib.nullcontext():
            loss_sum = token_loss_sum(model, batch, run.autocast, run.cfg.loss_chunk)
            # DDP and FSDP average gradients over processes; scale so the result is d(sum / targets).
            (loss_sum * (run.dist.world / targets)).backward()
        loss += loss_sum.item()
        run.tokens_done += int(batch["attention_mask"].sum())
    loss = all_sum(loss, run.dist, run.device) / targets
    if not math.isfinite(loss):
        run.optimizer.zero_grad(set_to_none=True)
        raise TrainingError(f"the loss became {loss} at step {s + 1}; training stopped and no adapter was written "
                            f"for it; {_where_to_continue(run, 'after lowering lr')}")
    # The norm is computed even without clipping (inf leaves the gradients as they are): a finite loss can still
    # give non-finite gradients, and one optimizer step with them would poison every weight and checkpoint.
    max_norm = run.cfg.max_grad_norm if run.cfg.max_grad_norm > 0 else float("inf")
    # Under FSDP the gradients are DTensor shards: clip_grad_norm_ gives the global norm across them.
    norm = float(full_value(torch.nn.utils.clip_grad_norm_(list(run.named.values()), max_norm)))
    if not math.isfinite(norm):
        run.optimizer.zero_grad(set_to_none=True)
        raise TrainingError(f"the gradient norm became {norm} at step {s + 1} (the loss was {loss:.4g}); training "
                            f"stopped before the update; {_where_to_continue(run, 'after lowering lr')}")
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.losses.append(loss)
    return loss, lr


def _micro_batches(run: Run, s: int) -> tuple[list[dict], int]:
    """This process's micro-batches of global batch s, and the global batch's count of target tokens."""
    cfg, g = run.cfg, run.global_batch
    rows = [run.sampler(s * g + i) for i in range(g)]
    micro = []
    for m in range(cfg.grad_accum):
        lo = (m * run.dist.world + run.dist.rank) * cfg.batch_size
        micro.append(collate([run.train_data.examples[i] for i in rows[lo:lo + cfg.batch_size]],
                             run.tokenizer.pad_token_id))
    return micro, sum(run.train_data.examples[i].n_targets for i in rows)


def evaluate_now(run: Run, at_step: int, bar=None) -> float:
    """The mean token loss over the evaluation set, recorded for step `at_step`."""
    e = evaluate(run.model, run.eval_data, run.cfg.batch_size, run.tokenizer.pad_token_id, run.device, run.autocast,
                 run.cfg.loss_chunk)
    run.eval_losses.append((at_step, e))
    if run.dist.main:
        append_metrics(run.work / METRICS_NAME, {"step": at_step, "eval_loss": e})
        if bar is not None and run.cfg.progress:
            bar.write(f"step {at_step}: eval loss {e:.4f}")
    return e


def save(run: Run) -> None:
    """A checkpoint of the state after run.done steps (the main process writes it; under sharding="fsdp" every
    process writes its shards), then prune old ones."""
    state = {"global_batch": run.global_batch, "total_steps": run.total_steps,
             "samples_seen": run.done * run.global_batch, "world_size": run.dist.world, "seed": run.cfg.seed,
             "sharding": run.cfg.sharding, "optimizer": run.cfg.optimizer,
             "seconds": _seconds(run), "peak_memory_mb": max(run.peak_before, peak_memory_mb(run.device)),
             **_base_settings(run.cfg)}
    if run.cfg.sharding == "fsdp":
        adapter_fn = _sharded_adapter_writer(run) if run.is_lora else None
        path = ckpt_io.write_sharded_checkpoint(run.work, run.done, run.named, run.optimizer, run.scheduler, state,
                                                run.dist, adapter_fn)
        if run.dist.main:
            note_written(run.work, ["checkpoints"])
            ckpt_io.prune(run.work, run.cfg.keep_checkpoints)
        barrier(run.dist)
        run.last_checkpoint = ckpt_io.Checkpoint(path, run.done, state)
        return
    if not run.dist.main:
        return
    adapter_fn = _adapter_writer(run.model) if run.is_lora else None
    path = ckpt_io.write_checkpoint(run.work, run.done, run.named, run.optimizer, run.scheduler, state, adapter_fn)
    note_written(run.work, ["checkpoints"])
    ckpt_io.prune(run.work, run.cfg.keep_checkpoints)
    run.last_checkpoint = ckpt_io.Checkpoint(path, run.done, state)


def _progress_bar(run: Run):
    import sys

    from tqdm.auto import tqdm

    desc = "full" if run.cfg.method == "full" else f"{run.cfg.method} r={run.cfg.lora.r}"
    return tqdm(total=run.total_steps, initial=run.start_step, disable=not (run.cfg.progress and run.dist.main),
                desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True, leave=True)


def _wrap_ddp(run: Run):
    if run.dist.world == 1 or run.fsdp:  # FSDP: setup() sharded the model itself
        return run.model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(run.model, device_ids=[run.device.index] if run.device.type == "cuda" else None)


def _report_step(run: Run, bar, loss: float, lr: float) -> None:
    elapsed = time.perf_counter() - run.t_loop
    tps = run.tokens_done * run.dist.world / max(elapsed, 1e-9)
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}", refresh=False)
    bar.update(1)
    if run.dist.main and (run.done % run.cfg.log_every == 0 or run.done == run.total_steps):
        append_metrics(run.work / METRICS_NAME, {"step": run.done, "loss": loss, "lr": lr,
                                                 "tokens_per_s": round(tps, 1), "elapsed_s": round(elapsed, 3)})


# ---------------------------------------------------------------------------------------------- the end

def _seconds(run: Run) -> float:
    """The run's training seconds so far: this session's loop plus, after --resume, the sessions before."""
    return run.seconds_before + time.perf_counter() - run.t_start


def result(run: Run) -> TrainResult:
    tps = run.tokens_done * run.dist.world / max(time.perf_counter() - run.t_loop, 1e-9)
    return TrainResult(run.out, run.cfg.method, run.total_steps, run.losses, run.eval_losses, run.trainable,
                       run.total_params, _seconds(run), tps, max(run.peak_before, peak_memory_mb(run.device)),
                       run.resumed_from, run.data_report)


def finish(run: Run) -> TrainResult:
    """Write the final artefacts into run.work; summary.json goes last and marks the run finished."""
    from ..models import default_model_path

    res = result(run)
    with whole_parameters(run.model, run.dist, trainable_only=run.is_lora) if run.fsdp else contextlib.nullcontext() as values:
        if not run.dist.main:
            return res
        before = {p.name for p in run.work.iterdir()}
        # FSDP: the main process holds the gathered model; a full model is saved from the gathered tensors.
        save_final_model(run.model, run.tokenizer, run.work, run.is_lora, state_dict=None if run.is_lora else values)
    default = run.base_path == default_model_path()
    name = "kjv-llama-tiny (default)" if default else run.base_path.name
    plot_losses(run.work / METRICS_NAME, run.work / PLOT_NAME, title=f"full fine-tuning of {name}"
                if run.cfg.method == "full" else f"{run.cfg.method} r={run.cfg.lora.r} on {name}")
    write_json(run.work / DONE_MARKER, {
        "method": res.method, "base_model": str(run.base_path), "steps": res.steps,
        "loss_first": res.losses[0] if res.losses else None, "loss_last": res.losses[-1] if res.losses else None,
        "eval_losses": res.eval_losses, "trainable_params": res.trainable, "total_params": res.total,
        "trainable_percent": round(res.trainable_percent, 4), "seconds": round(res.seconds, 2),
        "tokens_per_second": round(res.tokens_per_second, 1), "peak_memory_mb": round(res.peak_memory_mb, 1),
        "resumed_from_step": res.resumed_from, "default_model": default})
    if run.work == run.out:  # written in place: the marker lists what rankdial wrote (atomic_dir does it itself)
        note_written(run.out, set(p.name for p in run.out.iterdir()) - before)
    run.say(summary_text(res))
    return res


def summary_text(r: TrainResult) -> str:
    lines = [f"done: {r.method}, {r.steps} steps in {r.seconds:.1f} s ({r.tokens_per_second:,.0f} tokens/s), "
             f"peak memory {r.peak_memory_mb:.0f} MB"]
    if r.losses:
        lines.append(f"  train loss {r.losses[0]:.4f} -> {r.losses[-1]:.4f}")
    if r.eval_losses:
        lines.append(f"  eval loss {r.eval_losses[0][1]:.4f} -> {r.eval_losses[-1][1]:.4f}")
    lines.append(f"  output: {r.output_dir}")
    return "\n".join(lines)


def _where_to_continue(run: Run, advice: str = "") -> str:
    """What is left to continue from, for the messages of a stopped run."""
    if run.mode == "replace":
        return (f"the old run in {run.out} is untouched and this run's files were removed (an interrupted "
                "--overwrite keeps nothing; run the same command again to start over)")
    if run.last_checkpoint is not None:
        return (f"the last good checkpoint is {run.last_checkpoint.path} (step {run.last_checkpoint.step}); continue "
                f"from it by running the same command with --resume{' ' + advice if advice else ''}")
    return ("no checkpoint was written (set save_every, e.g. --save-every 50, to make a run resumable); "
            "--resume would start again from step 0")


def interrupted(run: Run | None) -> TrainingInterrupted:
    """The one-line message for Ctrl-C: where training stopped, the last checkpoint and how to resume."""
    if run is None or run.work is None:
        return TrainingInterrupted("training was interrupted (Ctrl-C) before its first step; nothing was written")
    return TrainingInterrupted(f"training was interrupted (Ctrl-C) after step {run.done} of {run.total_steps} in "
                               f"{run.out}; {_where_to_continue(run)}")
