"""One request, as every part of the serving engine sees it (the one record), and the checks that make one.

A Request is made by RequestChecks.check() (everything a client can get wrong raises a RequestError naming the
field, before anything is queued), given an id, a Handle and a sampling generator when the engine takes it, and
then read and written in place by each part in turn:

    engine     state and ended, text (its TextStream), holds_adapter (the registry's acquire/release)
    registry   parks it while its adapter loads (AdapterRegistry.admit)
    scheduler  admission under the limits: prompt_tokens, max_tokens, generated; record() appends tokens
    runner     its slot in the KV cache: prompt, tokens, adapter; sample() reads params and generator and sets failure

Plain Python: no torch import (the scheduler's tests hold it to that through this module too).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from ..errors import NOT_UTF8, RequestError, not_utf8

if TYPE_CHECKING:  # types only: importing this module imports no torch
    from ..sampling import SamplingParams
    from .detokenizer import TextStream
    from .handle import Handle

WAITING, PARKED, RUNNING, FINISHED, CANCELLED = "waiting", "parked", "running", "finished", "cancelled"


@dataclass(eq=False)
class Request:
    """One generation request: who it is, its adapter (None: the base), its tokens and how to sample them."""

    id: str
    adapter: str | None
    prompt: list[int]
    params: SamplingParams
    generator: Any = None  # torch.Generator for a seeded request (rankdial.sampling.make_generator), else None
    tokens: list[int] = field(default_factory=list)  # generated so far
    state: str = WAITING
    failure: str | None = None  # set by sample() when this row's last token could not be sampled
    handle: Handle | None = None  # what its client holds (None for a request driven without an engine)
    text: TextStream | None = None  # its completion as text, stop sequences held back
    holds_adapter: bool = False  # its adapter is acquired in the registry (released when it ends)
    ended: bool = False  # its final event was sent: nothing more happens to it
    cancelled: bool = False  # its client cancelled (Handle.cancel, any thread): it ends at the next step

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)

    @property
    def max_tokens(self) -> int:
        return self.params.max_tokens

    @property
    def generated(self) -> int:
        return len(self.tokens)

    @property
    def reserved(self) -> int:
        """The most tokens this request can ever hold in the KV cache."""
        return self.prompt_tokens + self.max_tokens

    @property
    def in_flight(self) -> int:
        return self.prompt_tokens + self.generated


def bad(param: str, message: str) -> RequestError:
    """A RequestError naming the request field at fault (the API answers it as the error's param)."""
    err = RequestError(message)
    err.param = param
    return err


class RequestChecks:
    """What a request may be on one served model: its prompt (text or token ids), max_tokens, chat messages."""

    def __init__(self, tokenizer, vocab_size: int, base_name: str, *, max_prompt_tokens: int, max_new_tokens: int,
                 max_total: int):
        self.tokenizer, self.vocab_size, self.base_name = tokenizer, vocab_size, base_name
        self.max_prompt_tokens, self.max_new_tokens, self.max_total = max_prompt_tokens, max_new_tokens, max_total

    def params(self, params: SamplingParams) -> None:
        """The sampling settings' own checks (before anything is looked up on disk)."""
        from ..sampling import SamplingParams

        if not isinstance(params, SamplingParams):
            raise RequestError(f"params must be a SamplingParams, got {type(params).__name__}")
        if params.max_tokens > self.max_new_tokens:
            raise bad("max_tokens", f"max_tokens is {params.max_tokens}, more than this server's limit of "
                                    f"{self.max_new_tokens}; ask for fewer tokens")

    def check(self, prompt: str | list[int], adapter: str | None, params: SamplingParams,
              lookup: Callable[[str], str] | None = None) -> Request:
        """The request (no id yet) or a RequestError naming the field. The sampling settings are checked first:
        `lookup` (the caller's adapter check, which may look on disk) runs only for a request whose settings pass."""
        self.params(params)
        if adapter is not None and lookup is not None:
            adapter = lookup(adapter)
        ids = self.tokens(prompt)
        total = len(ids) + params.max_tokens
        if total > self.max_total:
            raise bad("max_tokens", f"the prompt ({len(ids)} tokens) plus max_tokens ({params.max_tokens}) is {total} "
                                    f"tokens, more than this model serves ({self.max_total}); shorten the prompt or "
                                    "lower max_tokens")
        return Request("", adapter, ids, params)

    def tokens(self, prompt) -> list[int]:
        """The prompt's token ids: a string is tokenized, a list of ints is checked against the vocabulary."""
        if isinstance(prompt, str):
            check_unicode(prompt, "prompt")
            ids = self.tokenizer.encode(prompt, add_special_tokens=False) if prompt else []
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
            wrong = [t for t in ids if not 0 <= t < self.vocab_size]
            if wrong:
                raise bad("prompt", f"prompt token ids must be in [0, {self.vocab_size}), got {wrong[:5]}")
        else:
            raise bad("prompt", f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise bad("prompt", "the prompt is empty; send at least one token of text")
        if len(ids) > self.max_prompt_tokens:
            raise bad("prompt", f"the prompt has {len(ids)} tokens, more than this server's limit of "
                                f"{self.max_prompt_tokens}; shorten it")
        return ids

    def chat_prompt(self, messages: list[dict]) -> str:
        """The prompt for a chat, from the tokenizer's chat template (with the assistant's turn opened)."""
        ok = isinstance(messages, list) and messages and all(
            isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str)
            for m in messages)
        if not ok:
            raise bad("messages", "messages must be a non-empty list of {'role': 'system'|'user'|'assistant', "
                                  f"'content': str}}, got {str(messages)[:200]}")
        for m in messages:
            check_unicode(m["content"], "messages' content")
        if not getattr(self.tokenizer, "chat_template", None):
            raise bad("messages", f"the base model {self.base_name} has no chat template; use /v1/completions")
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages],
                                                      tokenize=False, add_generation_prompt=True)
        except TemplateError as err:  # the template refused these messages (raise_exception): the client's to fix
            raise bad("messages", f"the chat template of {self.base_name} refused these messages: "
                                  f"{str(err).splitlines()[0][:200] if str(err) else type(err).__name__}") from None


def check_unicode(text: str, field: str) -> None:
    if not_utf8(text):
        raise bad("prompt" if field == "prompt" else "messages", f"{field} {NOT_UTF8}")


__all__ = ["Request", "RequestChecks", "WAITING", "PARKED", "RUNNING", "FINISHED", "CANCELLED"]
