"""From `rankdial serve`'s flags to a ready app: the flags checked together, the engine built with the token
limits (the engine is their one source of truth), the keys read from the flags or the environment."""

from __future__ import annotations

import argparse
import ipaddress
import math
import os

from ..errors import ConfigError


def check_serve_flags(args: argparse.Namespace) -> None:
    """ConfigError listing every bad flag at once."""
    bad = [f"{flag} must be positive, got {value}" for flag, value in (
        ("--max-tokens", args.max_tokens), ("--max-prompt-tokens", args.max_prompt_tokens),
        ("--max-body-kb", args.max_body_kb), ("--budget-mb", args.budget_mb), ("--max-batch", args.max_batch),
        ("--max-tokens-in-flight", args.max_tokens_in_flight), ("--max-prefill-tokens", args.max_prefill_tokens),
        ("--drain-timeout", args.drain_timeout)) if value is not None and not value > 0]  # not >: NaN too
    bad += [f"{flag} must be a finite number, got {value}" for flag, value in (
        ("--budget-mb", args.budget_mb), ("--drain-timeout", args.drain_timeout))
        if value is not None and value > 0 and not math.isfinite(value)]
    if args.budget_mb is not None and 0 < args.budget_mb < 2**-20:
        bad.append(f"--budget-mb {args.budget_mb:g} is less than one byte; give MiB of adapter weights, e.g. 256")
    if args.max_tokens_in_flight == 1:  # every request holds one prompt token and one new token at least
        bad.append("--max-tokens-in-flight 1 leaves no room for any request (a prompt token and a new token need 2); "
                   "give at least 2, e.g. 16384 (the default)")
    if not 0 <= args.port <= 65535:
        bad.append(f"--port must be in 0-65535 (0 picks a free one), got {args.port}")
    if bad:
        raise ConfigError("; ".join(bad))


def app_from_args(args: argparse.Namespace, *, freeze_gc: bool = True):
    """The FastAPI app for `rankdial serve`'s flags, and one line describing it (with {url} to fill in).

    freeze_gc: the base lives as long as the server, so the GC never rescans it (off in tests)."""
    from .api import ApiLimits, create_app
    from .engine import Engine

    check_serve_flags(args)
    keys = [k.strip() for k in (args.api_key or os.environ.get("RANKDIAL_API_KEYS", "").split(",")) if k.strip()]
    admin = args.admin_key or os.environ.get("RANKDIAL_ADMIN_KEY") or None
    budget = int(args.budget_mb * 2**20) if args.budget_mb is not None else None
    engine = Engine.from_pretrained(args.base, args.adapters, qlora=args.qlora, device=args.device, budget_bytes=budget,
                                    freeze_gc=freeze_gc, max_new_tokens=args.max_tokens,
                                    compile=getattr(args, "compile", False),
                                    max_prompt_tokens=args.max_prompt_tokens, **{k: v for k, v in (
                                        ("max_batch_size", args.max_batch),
                                        ("max_tokens_in_flight", args.max_tokens_in_flight),
                                        ("max_prefill_tokens", args.max_prefill_tokens)) if v is not None})
    app = create_app(engine, api_keys=keys, admin_key=admin, limits=ApiLimits(max_body_bytes=args.max_body_kb * 1024),
                     drain_timeout=args.drain_timeout)
    names = sorted(engine.registry.names())
    line = (f"rankdial serve: {engine.base_name} with {len(names)} adapter(s) ({', '.join(names) or 'none'}) on "
            f"{{url}}  (API keys: {'on' if keys else 'off'}, admin key: {'on' if admin else 'off'}, max_tokens "
            f"<= {min(engine.max_new_tokens, engine.checks.max_total - 1)}, prompt <= {engine.max_prompt_tokens} tokens, batch <= "
            f"{engine.scheduler.limits.max_batch_size}, KV cache {engine.runner.cache.nbytes / 2**20:.0f} MiB, "
            f"{_compile_words(engine)})")
    app.state.startup_warnings = serve_warnings(args, engine, bool(keys))
    broken = engine.registry.check_folders()  # files, configs, safetensors headers: a broken folder is said now
    if broken:
        shown = ", ".join(broken[:8]) + (f" and {len(broken) - 8} more" if len(broken) > 8 else "")
        app.state.startup_warnings.append(f"rankdial serve: warning: {len(broken)} adapter folder(s) cannot be "
                                          f"served: {shown}; GET /v1/models says why (the log has each reason)")
    return app, line


def _compile_words(engine) -> str:
    """The start-up line's word on --compile: off, or the compiled decode step's warm-up time (or its failure)."""
    if engine.compile_seconds is None:
        return "compile off" + (": measured ~2x slower than eager on a CPU" if engine.runner.device.type == "cpu" else "")
    status = engine.runner.compile_status
    return (f"compiled decode step warmed up in {engine.compile_seconds:.1f} s" if status == "on"
            else f"compile failed after {engine.compile_seconds:.1f} s, decoding eagerly")


def serve_warnings(args: argparse.Namespace, engine, keys_on: bool) -> list[str]:
    """One-line warnings for a server that starts but is likely not what was meant."""
    warnings = []
    if not keys_on and not _is_loopback(args.host):
        warnings.append(f"rankdial serve: warning: --host {args.host} listens beyond this machine and no --api-key is "
                        "set: every route, including loading and unloading adapters, is open to the network; pass "
                        "--api-key (and --admin-key)")
    for flag, value in (("--max-tokens", args.max_tokens), ("--max-prompt-tokens", args.max_prompt_tokens)):
        if value is not None and value > engine.context:
            warnings.append(f"rankdial serve: warning: {flag} {value} is above {engine.base_name}'s context of "
                            f"{engine.context} tokens; a request gets at most {engine.context} tokens of prompt and "
                            "completion together")
    return warnings


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


_GRACE_MARGIN_S = 2.0  # uvicorn waits this much past --drain-timeout, so the engine's 'cancelled' events land first


def graceful_seconds(drain_timeout: float) -> float:
    """How long uvicorn waits for open connections after the first signal: the engine's drain (begun on the same
    signal) ends the requests still running at drain_timeout with a final 'cancelled' event first, so
    --drain-timeout bounds the shutdown over HTTP too."""
    return drain_timeout + _GRACE_MARGIN_S


__all__ = ["check_serve_flags", "app_from_args", "serve_warnings", "graceful_seconds"]
