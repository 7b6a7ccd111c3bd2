"""The request bodies of the OpenAI-compatible API, as pydantic models: field names and ranges are OpenAI's.

Types are strict (a number where OpenAI takes one, true/false where it takes a boolean: `"stream": "yes"`,
`max_tokens: true` or `seed: "7"` is a 422 naming the field; an integer is fine where a float is taken).
Unknown fields are refused (a typo such as `max_token` gets a 422 naming it instead of being ignored); the
OpenAI fields that only have one meaning here are accepted at that meaning: `n` 1, `echo` false, `logprobs`
off, `user` (ignored), `presence_penalty` / `frequency_penalty` 0, `logit_bias` empty, `response_format`
{"type": "text"}, `stream_options` (include_usage honoured), `max_completion_tokens` (chat: max_tokens' newer
name), role "developer" (a system message). FIELD_HELP is what a 422 says about each field.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator, \
    model_validator

from ..errors import NOT_UTF8, AdapterError, not_utf8, shorten
from .registry import check_adapter_folder_name

Number = Union[StrictInt, StrictFloat]

# what a 422 says about a field (the top-level name is the error's param); a validator's own message wins
FIELD_HELP = {
    "model": "model must be a non-empty string: an adapter's name or the base model's (GET /v1/models lists them)",
    "prompt": "prompt must be a non-empty string, a list of token ids (integers) or a list of one string",
    "messages": "messages must be a non-empty list of {\"role\": \"system\"|\"developer\"|\"user\"|\"assistant\", "
                "\"content\": a string or a list of {\"type\": \"text\", \"text\": a string}}",
    "max_tokens": "max_tokens must be an integer of at least 1",
    "max_completion_tokens": "max_completion_tokens must be an integer of at least 1",
    "temperature": "temperature must be a number from 0 to 2",
    "top_p": "top_p must be a number above 0 and at most 1",
    "stop": "stop must be a string or a list of up to 4 non-empty strings",
    "seed": "seed must be an integer from 0 to 2**63-1",
    "stream": "stream must be true or false",
    "stream_options": "stream_options must be {\"include_usage\": true or false}",
    "n": "n must be 1 here (one choice per request; send the request again for more)",
    "user": "user must be a string",
    "echo": "echo must be false here",
    "logprobs": "logprobs are not supported here; leave logprobs out (or null / false)",
    "presence_penalty": "presence_penalty is not supported here; leave it out or send 0",
    "frequency_penalty": "frequency_penalty is not supported here; leave it out or send 0",
    "logit_bias": "logit_bias is not supported here; leave it out or send null or {}",
    "response_format": "response_format must be {\"type\": \"text\"} here (no JSON mode)",
    "name": "name must be a plain folder name (letters, digits, '_' and '-', at most 128, starting with a "
            "letter or digit), e.g. 'sql-v2'",
    "path": "path must be a non-empty string: the adapter's folder",
    "pin": "pin must be true or false",
    "lora_name": "lora_name must be a plain folder name (letters, digits, '_' and '-', at most 128, starting with a "
                 "letter or digit), e.g. 'sql-v2'",
    "lora_path": "lora_path must be a non-empty string: the adapter's folder",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _unicode(value, field: str):
    """value, if every string in it can be encoded as UTF-8 (JSON lets a lone surrogate such as \\ud800 through)."""
    texts = [value] if isinstance(value, str) else [v for v in (value or ()) if isinstance(v, str)]
    if any(not_utf8(text) for text in texts):
        raise ValueError(f"{field} {NOT_UTF8}")
    return value


def _folder_path(value, field: str):
    """value, a path the file system can be asked about (no NUL byte, which no path holds, and UTF-8)."""
    if value is not None and "\x00" in value:
        raise ValueError(f"{field} holds a NUL byte (\\u0000), which no folder's path holds; send the folder's path")
    return _unicode(value, field)


class StreamOptions(_Strict):
    include_usage: StrictBool = False
    include_obfuscation: StrictBool | None = None  # the openai client's option; nothing to obfuscate here


class ResponseFormat(_Strict):
    type: Literal["text"]


class _Sampling(_Strict):
    """The sampling fields shared by completions and chat completions."""
    model: StrictStr = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)  # None: 16 (OpenAI's default), or the server's limit if lower
    temperature: Number = Field(1.0, ge=0.0, le=2.0)
    top_p: Number = Field(1.0, gt=0.0, le=1.0)
    stop: Union[StrictStr, list[StrictStr], None] = Field(None)
    seed: StrictInt | None = Field(None, ge=0, lt=2**63)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1          # one choice per request; ask again for more
    user: StrictStr | None = None    # accepted and ignored, as OpenAI's own servers only log it
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    logit_bias: dict[str, Number] | None = None
    response_format: ResponseFormat | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4:
            raise ValueError(FIELD_HELP["stop"] + f", got {len(stops)} stop sequences")
        empty = [i for i, s in enumerate(stops) if not s]
        if empty:
            where = "" if isinstance(value, str) else f" at stop[{empty[0]}]"
            raise ValueError(FIELD_HELP["stop"] + f", got an empty string{where}")
        return tuple(_unicode(stops, "stop"))

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value, info):
        if value not in (None, 0):
            raise ValueError(f"{info.field_name} {value} is not supported here; leave it out or send 0")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value):
        if value:
            raise ValueError("logit_bias is not supported here; leave it out or send null or {}")
        return value

    @field_validator("user")
    @classmethod
    def _user(cls, value):
        return _unicode(value, "user")


class CompletionRequest(_Sampling):
    prompt: Union[StrictStr, list[StrictInt], list[StrictStr]]
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
            raise ValueError("prompt is empty; send at least one token of text")
        return _unicode(value, "prompt")


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[StrictStr, list[TextPart]]
    name: StrictStr | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, value):
        return _unicode(value if isinstance(value, str) else [p.text for p in value], "content") and value

    def as_dict(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: Literal[False, None] = None
    max_completion_tokens: StrictInt | None = Field(None, ge=1)  # max_tokens' newer name in OpenAI's chat API

    @field_validator("max_completion_tokens")
    @classmethod
    def _same_as_max_tokens(cls, value, info):
        other = info.data.get("max_tokens")
        if value is not None and other is not None and other != value:
            raise ValueError(f"max_tokens ({other}) and max_completion_tokens ({value}) differ; send one of them")
        return value

    @model_validator(mode="after")
    def _one_max(self):
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self


class AdapterLoad(_Strict):
    name: StrictStr  # the registry's one rule for a name (check_adapter_folder_name)
    path: StrictStr | None = Field(None, min_length=1)
    pin: StrictBool | None = None  # true: pin; false: unpin; absent: leave as it is

    @field_validator("name")
    @classmethod
    def _plain_folder_name(cls, value):
        try:
            return check_adapter_folder_name(value)
        except AdapterError:  # pydantic reports a ValueError as a 422 naming the field
            raise ValueError(FIELD_HELP["name"] + f", got {shorten(value)}") from None

    @field_validator("path")
    @classmethod
    def _path(cls, value):
        return _folder_path(value, "path")


class LoraUnload(_Strict):
    """vLLM's POST /v1/unload_lora_adapter body."""
    lora_name: StrictStr

    @field_validator("lora_name")
    @classmethod
    def _plain_folder_name(cls, value):
        try:
            return check_adapter_folder_name(value)
        except AdapterError:
            raise ValueError(FIELD_HELP["lora_name"] + f", got {shorten(value)}") from None


class LoraLoad(LoraUnload):
    """vLLM's POST /v1/load_lora_adapter body (load_inplace, vLLM's reload under a name in use, is not offered)."""
    lora_path: StrictStr = Field(min_length=1)

    @field_validator("lora_path")
    @classmethod
    def _path(cls, value):
        return _folder_path(value, "lora_path")
