"""Dependency messages a rankdial user cannot act on, dropped at their source: each one narrowly, with why.

Installed by `import rankdial` (before any dependency that emits them is imported), so the library, every verb
and `./dev.sh setup` start without them. Only these exact messages from these exact loggers are dropped;
everything else those packages say still reaches the user.
"""

from __future__ import annotations

import logging

# logger name -> the beginnings of the messages dropped from it
NOISE = {
    # bitsandbytes' CPU backend, at import on a CPU with AVX512-BF16, tries to fetch an optional fused 4-bit matmul
    # from the Hugging Face Hub (remote code, through the `kernels` package) and warns when it cannot: offline,
    # or when the publisher check fails. rankdial never downloads code, does not need that kernel (its NF4 path
    # has its own dequantizer and falls back to bitsandbytes' built-in one), and the advice in the message
    # ("pip install kernels") does not apply: it is installed. Nothing for the user to do, so it is dropped.
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
    # the same attempt, one level down: `kernels` says offline mode skips its trust check for that repository.
    # Only that repository's message is dropped; a kernel the user asks for themselves still warns.
    "kernels._internals.hf_hub": ("Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'",),
}


class _Drop(logging.Filter):
    """Rejects a logger's records whose message begins with one of `prefixes`."""

    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def install() -> None:
    """Attach the filters (once per process; cheap: no dependency is imported)."""
    for name, prefixes in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(prefixes))
