"""The request bodies of the OpenAI-compatible API, as pydantic models: field names and ranges are OpenAI's.

Unknown fields are refused (a typo such as `max_token` gets a 422 naming it instead of being ignored); the
OpenAI fields that only have one meaning here (`n`, `echo`, `logprobs`, `user`) are accepted at that meaning.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import AdapterError
from .registry import check_adapter_folder_name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """The sampling fields shared by completions and chat completions."""
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # None: 16 (OpenAI's default), or the server's limit if lower
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1          # one choice per request; ask again for more
    user: str | None = None    # accepted and ignored, as OpenAI's own servers only log it

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return tuple(stops)


class CompletionRequest(_Sampling):
    prompt: Union[str, list[int], list[str]]
    echo: Literal[False] = False
    logprobs: None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list) and value and isinstance(value[0], str):
            if len(value) != 1:
                raise ValueError(f"one prompt per request, got a batch of {len(value)}; send one request each")
            value = value[0]
        if not value:
            raise ValueError("prompt is empty")
        return value


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: str | None = None

    def as_dict(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": text}


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: Literal[False, None] = None


class AdapterLoad(_Strict):
    name: str  # the registry's one rule for a name (check_adapter_folder_name)
    path: str | None = Field(None, min_length=1)
    pin: bool = False

    @field_validator("name")
    @classmethod
    def _plain_folder_name(cls, value):
        try:
            return check_adapter_folder_name(value)
        except AdapterError as err:  # pydantic reports a ValueError as a 422 naming the field
            raise ValueError(str(err)) from None
