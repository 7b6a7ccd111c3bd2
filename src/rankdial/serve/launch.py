"""From `rankdial serve`'s flags to a ready app: the flags checked together, the engine built with the token
limits (the engine is their one source of truth), the keys read from the flags or the environment."""

from __future__ import annotations

import argparse
import os

from ..errors import ConfigError


def check_serve_flags(args: argparse.Namespace) -> None:
    """ConfigError listing every bad flag at once."""
    bad = [f"{flag} must be positive, got {value}" for flag, value in (
        ("--max-tokens", args.max_tokens), ("--max-prompt-tokens", args.max_prompt_tokens),
        ("--max-body-kb", args.max_body_kb), ("--budget-mb", args.budget_mb),
        ("--drain-timeout", args.drain_timeout)) if value is not None and value <= 0]
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
                                    max_prompt_tokens=args.max_prompt_tokens)
    app = create_app(engine, api_keys=keys, admin_key=admin, limits=ApiLimits(max_body_bytes=args.max_body_kb * 1024),
                     drain_timeout=args.drain_timeout)
    names = sorted(engine.registry.names())
    line = (f"rankdial serve: {engine.base_name} with {len(names)} adapter(s) ({', '.join(names) or 'none'}) on "
            f"{{url}}  (API keys: {'on' if keys else 'off'}, admin key: {'on' if admin else 'off'}, max_tokens "
            f"<= {engine.max_new_tokens}, prompt <= {engine.max_prompt_tokens} tokens)")
    return app, line


__all__ = ["check_serve_flags", "app_from_args"]
