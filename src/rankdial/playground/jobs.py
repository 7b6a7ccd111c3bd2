"""Training jobs for the playground: real LoRA runs in a background thread, their losses as a stream of events.

Fair use: one job per client at a time, at most `max_running` jobs on the machine, caps on steps, rank and data
(`Limits`); a job can be cancelled, and a job nobody has listened to for `grace_s` seconds (the page was closed)
cancels itself at its next step. A job that fails ends with an "error" event holding one line, never a trace.
The math is the library's: `rankdial.train.loop`'s stages, `rankdial.rank.spectrum`, and (for the synthetic task)
`rankdial.claims.capacity.train_synthetic` on the claims report's task (`capacity.CLAIMS_TASK`).
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import RankdialError
from .claims_and_serving import run_steering_job

TASKS = ("text", "synthetic", "steering")
KEEP_FINISHED = 100  # finished jobs kept for their pages to read (the oldest go first)
EVAL_ROWS = 24  # held-out questions scored at each evaluation (of the 40 shipped): a live chart needs quick evals


@dataclass(frozen=True)
class Limits:
    """What one visitor may ask for (the API rejects more with a 4xx naming the field)."""

    max_steps: int = 200  # of the text task (a step: a batch of 8 through the default model)
    max_synthetic_steps: int = 2000  # of the synthetic task (a step: one 64x64 layer, 96-256 rows)
    max_rank: int = 64
    max_examples: int = 256
    max_ranks: int = 4  # runs in one sweep
    max_running: int = 2  # jobs on the whole machine at once (2 CPU cores)
    grace_s: float = 5.0  # a job with no listener for this long is cancelled
    max_steering_steps: int = 60  # of the steering task (each step runs for 2 tasks x (ranks + 1) x 2 rates)


class JobCancelled(Exception):
    """Raised inside a job's step callback to stop it (cancel, or its client went away)."""


class BusyError(RankdialError):
    """A client already runs a job, or the machine runs as many as it may (the API answers 409/429)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


@dataclass
class Job:
    id: str
    client: str
    spec: dict
    events: list[dict] = field(default_factory=list)
    state: str = "running"  # running | done | cancelled | error
    cancel_reason: str = ""
    listeners: int = 0
    last_seen: float = field(default_factory=time.monotonic)
    workdir: Path | None = None
    device: str = "cpu"  # where its models train (JobManager's, from rankdial.models.loading.pick_device)
    keep_adapter: Callable[[str, Path], None] | None = None  # (name, folder) of each finished text run
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def emit(self, event: dict) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def end(self, state: str, event: dict) -> None:
        """The last event and the final state together, so a stream that sees the state has seen the event."""
        with self._cond:
            self.events.append(event)
            self.state = state
            self._cond.notify_all()

    def events_since(self, i: int) -> list[dict]:
        with self._cond:
            return self.events[i:]

    def cancel(self, reason: str = "cancelled by the client") -> None:
        if self.state == "running" and not self.cancel_reason:
            self.cancel_reason = reason

    def check(self, grace_s: float) -> None:
        """Raise JobCancelled when the job was cancelled or nobody has listened for grace_s seconds."""
        if self.listeners == 0 and time.monotonic() - self.last_seen > grace_s:
            self.cancel("the page that started it went away")
        if self.cancel_reason:
            raise JobCancelled(self.cancel_reason)

    @property
    def finished(self) -> bool:
        return self.state != "running"


class JobManager:
    """Starts, tracks and cancels jobs; `runners` maps a task name to fn(job, check) that emits its events."""

    def __init__(self, limits: Limits | None = None, runners: dict[str, Callable] | None = None,
                 keep_adapter: Callable[[str, Path], None] | None = None, device: str = "auto"):
        from ..models.loading import pick_device

        self.device = str(pick_device(device))  # a bad device fails here, when the playground starts
        self.limits = limits or Limits()
        self.runners = runners or {"text": run_text_job, "synthetic": run_synthetic_job, "steering": run_steering_job}
        self.keep_adapter = keep_adapter
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def running(self) -> list[Job]:
        return [j for j in self.jobs.values() if not j.finished]

    def start(self, client: str, spec: dict) -> Job:
        with self._lock:
            mine = [j for j in self.running() if j.client == client]
            if mine:
                raise BusyError(f"you already have a training job running ({mine[0].id}); wait for it or cancel it "
                                "first (one job per visitor)", 409)
            if len(self.running()) >= self.limits.max_running:
                raise BusyError(f"the machine is running {len(self.running())} jobs, its limit; try again in a "
                                "minute", 429)
            finished = [j for j in self.jobs.values() if j.finished]
            for old in [j for j in finished if j.client == client] + finished[:-KEEP_FINISHED]:
                self.jobs.pop(old.id, None)  # a visitor's latest job only, and a bounded number in all
            job = Job(f"job-{secrets.token_urlsafe(12)}", client, spec, keep_adapter=self.keep_adapter, device=self.device)
            self.jobs[job.id] = job
        threading.Thread(target=self._run, args=(job,), name=f"playground-{job.id}", daemon=True).start()
        return job

    def _run(self, job: Job) -> None:
        job.workdir = Path(tempfile.mkdtemp(prefix=f"rankdial-playground-{job.id}-"))
        try:
            job.emit({"type": "start", "spec": job.spec})
            self.runners[job.spec["task"]](job, lambda: job.check(self.limits.grace_s))
            job.end("done", {"type": "done"})
        except JobCancelled as stop:
            job.end("cancelled", {"type": "cancelled", "message": str(stop)})
        except RankdialError as err:
            job.end("error", {"type": "error", "message": str(err).splitlines()[0]})
        except Exception as err:  # a crash in a job ends the job, never the server, and shows no trace
            first = str(err).splitlines()[0] if str(err) else "no message"
            job.end("error", {"type": "error", "message": f"the job failed: {type(err).__name__}: {first}"})
        finally:
            shutil.rmtree(job.workdir, ignore_errors=True)

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def shutdown(self, timeout: float = 10.0) -> None:
        for job in self.running():
            job.cancel("the playground is shutting down")
        deadline = time.monotonic() + timeout
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.05)


# ------------------------------------------------------------------------------------------------ the tasks

def run_text_job(job: Job, check: Callable[[], None]) -> None:
    """A real LoRA run per rank on the default model (Python docstring Q&A), streaming train and eval loss; each
    finished run's adapter is read back for its spectrum."""
    data, held_out = _write_text_data(job.workdir, job.spec["examples"])
    for r in job.spec["ranks"]:
        check()
        _text_run(job, r, _text_config(job, r, data, held_out), check)


def _write_text_data(workdir: Path, examples: int) -> tuple[Path, Path]:
    """The first `examples` shipped Q&A rows as train data and EVAL_ROWS held-out ones, as JSONL in workdir."""
    from ..models.loading import default_samples_path

    samples = default_samples_path()
    data, held_out = workdir / "train.jsonl", workdir / "eval.jsonl"
    for target, source, n in ((data, "pydoc_qa.jsonl", examples), (held_out, "pydoc_qa_eval.jsonl", EVAL_ROWS)):
        rows = (samples / source).read_text(encoding="utf-8").splitlines()[:n]
        target.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return data, held_out


def _text_config(job: Job, r: int, data: Path, held_out: Path):
    from ..train import make_config
    from ..train.config import LORA_DEFAULTS

    spec = job.spec
    return make_config({"data": str(data), "eval_data": str(held_out), "output_dir": str(job.workdir / f"r{r}"),
                        "steps": spec["steps"], "batch_size": 8, "r": r,
                        "lora_alpha": spec["alpha"] or LORA_DEFAULTS["lora_alpha"], "lr": spec["lr"],
                        "eval_every": max(1, spec["steps"] // 10), "max_length": 96, "progress": False,
                        "device": job.device, "seed": 0})


def _text_run(job: Job, r: int, cfg, check: Callable[[], None]) -> None:
    """One rank: set up (models.loading loads one model at a time), train streaming its losses, then its ΔW's
    spectrum."""
    from ..rank.spectrum import spectrum
    from ..train.loop import finish, fit, output_folder, setup

    run = setup(cfg, log=lambda *a, **k: None)
    job.emit({"type": "run", "rank": r, "trainable": run.trainable, "total": run.total_params,
              "steps": run.total_steps})
    sent = [0]

    def on_step(run):
        for at, value in run.eval_losses[sent[0]:]:  # the eval at step 0 comes before the first step
            job.emit({"type": "eval", "rank": r, "step": at, "eval_loss": value})
        sent[0] = len(run.eval_losses)
        job.emit({"type": "step", "rank": r, "step": run.done, "loss": run.losses[-1]})
        check()

    with output_folder(run):
        fit(run, on_step=on_step)
        res = finish(run)
    out = Path(cfg.output_dir)
    rows = [row.to_dict() for row in spectrum(out)]
    if job.keep_adapter is not None:
        job.keep_adapter(f"r{r}-{job.id}", out)
    job.emit({"type": "run_done", "rank": r, "eval_loss": res.eval_losses[-1][1], "loss": res.losses[-1],
              "seconds": round(res.seconds, 2), "spectrum": rows})


def run_synthetic_job(job: Job, check: Callable[[], None]) -> None:
    """The synthetic task with a known true rank (rankdial.claims.capacity): LoRA at each rank learns a target
    update of the claims report's true rank (capacity.CLAIMS_TASK) from `examples` noisy pairs; what it learned
    is its ΔW's spectrum."""
    from ..claims.capacity import CLAIMS_TASK, synthetic_task, train_synthetic
    from ..memory import lora_params
    from ..rank.spectrum import effective_rank

    spec = job.spec
    task = synthetic_task(**{**CLAIMS_TASK, "n_train": spec["examples"]})
    job.emit({"type": "task", **task.describe()})
    for r in spec["ranks"]:
        check()
        job.emit({"type": "run", "rank": r, "trainable": lora_params(task.d, task.d, r), "steps": spec["steps"]})

        def on_step(step, train, held, r=r):
            if step:
                job.emit({"type": "step", "rank": r, "step": step, "loss": train})
            job.emit({"type": "eval", "rank": r, "step": step, "eval_loss": held})

        res = train_synthetic(task, r, alpha=spec["alpha"], steps=spec["steps"], lr=spec["lr"],
                              eval_every=max(1, spec["steps"] // 50), on_step=on_step, should_stop=_stopper(check))
        check()  # a stopped run returns early: report it as cancelled, not done
        sv = torch.tensor(res.singular_values)
        rows = [{"module": f"synthetic ΔW (true rank {task.true_rank})", "rank": r, "d_in": task.d, "d_out": task.d,
                 "singular_values": res.singular_values[: max(r, task.true_rank) + 8],
                 "rank_90": effective_rank(sv, 0.9), "rank_99": effective_rank(sv, 0.99)}]
        job.emit({"type": "run_done", "rank": r, "loss": res.final_train, "eval_loss": res.final_eval,
                  "noise_floor": task.noise_floor, "spectrum": rows})


def _stopper(check: Callable[[], None]) -> Callable[[], bool]:
    def should_stop() -> bool:
        try:
            check()
        except JobCancelled:
            return True
        return False
    return should_stop


