"""A small double of the serving contract's Engine, for tests of the HTTP layer alone (routing, shapes, errors).

It answers deterministically: the reply to a prompt is the prompt's words reversed, tagged with the adapter,
one word per token, cut at max_tokens. Anything about generation itself is tested against the real engine.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from rankdial.errors import AdapterError, RequestError


@dataclass(frozen=True)
class Event:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    unavailable: bool = False
    refused: bool = False


@dataclass(frozen=True)
class Info:
    name: str
    path: str
    rank: int
    bytes: int
    loaded: bool
    pinned: bool


class FakeRegistry:
    def __init__(self, names=("alpha", "beta")):
        self.known = {n: Info(n, f"/adapters/{n}", 4, 1000, False, False) for n in names}
        self.hits = self.misses = self.evictions = 0
        self.loaded_bytes, self.budget_bytes = 0, None
        self.calls = []

    def names(self):
        return list(self.known)

    def exists(self, name):
        return name in self.known

    def loaded(self):
        return [n for n, i in self.known.items() if i.loaded]

    def info(self, name):
        if name not in self.known:
            raise AdapterError(f"unknown adapter {name!r}")
        return self.known[name]

    def load(self, name, path=None, *, pin=False, allow_any_path=False):
        self.calls.append(("load", name, path, allow_any_path))
        self.known[name] = Info(name, path or f"/adapters/{name}", 4, 1000, True, pin)
        self.misses += 1
        return self.known[name]

    def failure(self, name):
        return None

    def listing(self):
        return [(self.known[n], None) for n in sorted(self.known)]

    def unpin(self, name):
        self.calls.append(("unpin", name))
        self.known[name] = Info(name, self.known[name].path, 4, 1000, self.known[name].loaded, False)

    def unload(self, name):
        self.calls.append(("unload", name))
        return self.known.pop(name).loaded


class FakeHandle:
    def __init__(self, words, prompt_tokens, max_tokens, delay):
        self.words, self.prompt_tokens, self.max_tokens, self.delay = words, prompt_tokens, max_tokens, delay
        self.cancelled = False

    async def aevents(self):
        n = min(len(self.words), self.max_tokens)
        for i in range(n):
            if self.cancelled:
                yield Event("", "cancelled", self.prompt_tokens, i)
                return
            await asyncio.sleep(self.delay)
            yield Event(self.words[i], None, self.prompt_tokens, i + 1)
        yield Event("", "length" if n == self.max_tokens else "stop", self.prompt_tokens, n)

    def cancel(self):
        self.cancelled = True


class FakeEngine:
    base_name = "tiny-base"

    def __init__(self, delay: float = 0.0, fail_with: BaseException | None = None, registry=None,
                 max_new_tokens: int = 512):
        self.registry, self.delay, self.fail_with = registry or FakeRegistry(), delay, fail_with
        self.max_new_tokens = max_new_tokens
        self.started = self.stopped = False
        self.handles, self.prompts = [], []

    def start(self):
        self.started = True

    def shutdown(self, drain=True, timeout=30.0):
        self.stopped = True
        return 0

    async def prepare_async(self, adapter, timeout=10.0):
        if adapter is not None and not self.registry.exists(adapter):
            raise AdapterError(f"unknown adapter {adapter!r}")

    def submit(self, prompt, adapter, params):
        return self.enqueue(self.check(prompt, adapter, params))

    def check(self, prompt, adapter, params):
        if self.fail_with is not None:
            raise self.fail_with
        if adapter is not None and not self.registry.exists(adapter):
            raise AdapterError(f"unknown adapter {adapter!r}")
        if isinstance(prompt, list):
            prompt = " ".join(f"t{i}" for i in prompt)
        if len(prompt) > 2000:
            raise RequestError("prompt is too long")
        return prompt, adapter, params

    def enqueue(self, checked):
        prompt, adapter, params = checked
        self.prompts.append(prompt)
        words = [f" {w}" for w in reversed(prompt.split())] + [f" [{adapter or 'base'}]"]
        handle = FakeHandle(words, len(prompt.split()), params.max_tokens, self.delay)
        self.handles.append(handle)
        return handle

    def chat_prompt(self, messages):
        return " ".join(f"<{m['role']}> {m['content']}" for m in messages) + " <assistant>"

    def lora_requests(self):
        return {"max_lora": 8, "running": [], "waiting": []}

    def stats(self):
        return {"running": 0, "waiting": 0, "last_batch_size": 3, "steps": 7}

    class tokenizer:
        @staticmethod
        def encode(text, add_special_tokens=False):
            return text.split()
