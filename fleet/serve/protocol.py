"""The OpenAI-compatible wire format: request bodies (validated), responses, stream chunks, errors.

Request bodies are pydantic models (they are also the OpenAPI schema the app publishes);
``Generation params`` are what the model replica needs, checked against the serving limits.
Unknown fields are ignored, as OpenAI-compatible servers commonly do; fields fleet cannot honour
(n > 1, penalties, logit_bias, suffix) are refused with a 400 naming the field.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from fleet.errors import FleetError, NotFoundError, ValidationError

MAX_STOP = 4
MAX_LOGPROBS = 5


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False
    """Send a last chunk with the request's token usage."""


class _Sampling(_Body):
    model: str = Field(min_length=1, max_length=256)
    """A fleet model id (company, company/team or company/team/person)."""
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    """0 is greedy decoding."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass."""
    n: int = 1
    """Number of choices; fleet returns exactly one."""
    stream: bool = False
    """Send tokens as server-sent events as they are generated."""
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    """Up to 4 strings that end the completion (not included in it)."""
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    """Seed of this request's sampling (same seed, same tokens, whatever shares the batch)."""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def _common_checks(self) -> None:
        if self.n != 1:
            raise ValidationError("n must be 1: fleet returns one choice per request", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ValidationError(f"{name} is not supported; leave it at 0", param=name)
        if self.logit_bias:
            raise ValidationError("logit_bias is not supported", param="logit_bias")

    def stop_list(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOP:
            raise ValidationError(f"at most {MAX_STOP} stop strings", param="stop")
        if any(not s for s in stop):
            raise ValidationError("stop strings must be non-empty", param="stop")
        return stop

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    """POST /v1/completions (OpenAI's legacy completions)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    """One prompt: text, or token ids (a list holding one of those also works)."""
    max_tokens: int | None = Field(16, ge=0)
    """Tokens to generate (0 with echo: score the prompt only)."""
    echo: bool = False
    """Return the prompt before the completion."""
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    """Log-probabilities of the returned tokens and the top-k alternatives at each position."""
    best_of: int | None = None
    suffix: str | None = None

    def checked(self) -> CompletionRequest:
        self._common_checks()
        if self.best_of not in (None, 1):
            raise ValidationError("best_of must be 1", param="best_of")
        if self.suffix:
            raise ValidationError("suffix is not supported", param="suffix")
        if self.stream and self.logprobs is not None:
            raise ValidationError(
                "logprobs are returned without streaming only; set stream=false", param="logprobs"
            )
        self.stop_list()
        return self

    def single_prompt(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise ValidationError("send one prompt per request (n=1)", param="prompt")
            p = p[0]
        if isinstance(p, list) and not p:
            raise ValidationError("the prompt is empty", param="prompt")
        return p


class ContentPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    """The conversation, rendered through the base tokenizer's chat template."""
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False

    def checked(self) -> ChatRequest:
        self._common_checks()
        if self.logprobs:
            raise ValidationError(
                "chat logprobs are not supported; use /v1/completions with logprobs", param="logprobs"
            )
        self.stop_list()
        return self

    def template_messages(self) -> list[dict[str, str]]:
        # "developer" is OpenAI's newer name for the system role.
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in self.messages
        ]


def parse(model: type[BaseModel], raw: bytes, *, max_ids: int | None = None) -> Any:
    """Decode and validate a JSON body; every problem is a 400 naming the offending field.

    ``max_ids``: a prompt of token ids longer than this is a 413 (``context_length_exceeded``)
    before the ids are validated one by one.
    """
    try:
        data = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ValidationError(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValidationError("the request body must be a JSON object")
    if max_ids is not None:
        _check_id_lists(data.get("prompt"), max_ids)
    _check_strings(data)
    try:
        return model.model_validate(data)
    except PydanticValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise ValidationError(f"invalid request: {loc}: {err['msg']}", param=loc or None) from None
    except (ValueError, TypeError, RecursionError) as exc:
        raise ValidationError(f"invalid request: {exc}") from None


def _check_id_lists(prompt: Any, max_ids: int) -> None:
    lists = [prompt] if isinstance(prompt, list) else []
    if lists and prompt and isinstance(prompt[0], list):
        lists = prompt
    for ids in lists:
        if isinstance(ids, list) and len(ids) > max_ids and not (ids and isinstance(ids[0], str)):
            raise ContextLengthError(
                f"the prompt has {len(ids)} tokens; this model's context is {max_ids} tokens", param="prompt"
            )


def _check_strings(value: Any) -> None:
    """Refuse lone UTF-16 surrogates ("\\ud800" escapes): they are not text and cannot be tokenized or echoed."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValidationError("the request contains invalid Unicode (a lone surrogate escape)") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_strings(k)
            _check_strings(v)
    elif isinstance(value, list):
        for v in value:
            _check_strings(v)


# ---------------------------------------------------------------------- errors
_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


def error_body(status: int, message: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    kind = _TYPES.get(status) or ("server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_of(exc: FleetError) -> tuple[int, dict[str, Any]]:
    param = exc.context.get("param") if isinstance(exc.context, dict) else None
    return exc.http_status, error_body(exc.http_status, exc.message, exc.code, param)


class ContextLengthError(FleetError):
    """The prompt does not fit the base model's context."""

    http_status = 413
    code = "context_length_exceeded"


class BodyTooLargeError(FleetError):
    """The request body is larger than ``serve.max_body_bytes``; refused before (or while) it is read."""

    http_status = 413
    code = "request_too_large"


class ModelNotFoundError(NotFoundError):
    code = "model_not_found"


def model_not_found(model: str) -> FleetError:
    """The same answer for an unknown model and another company's model: nothing leaks."""
    return ModelNotFoundError(
        f"The model '{model}' does not exist or you do not have access to it.", param="model"
    )


# ---------------------------------------------------------------------- responses
@dataclass
class Reply:
    """The parts of an answer the ingress builds a response from."""

    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_response(
    reply: Reply, model: str, text: str, finish: str, logprobs, use: dict
) -> dict[str, Any]:
    return {
        "id": f"cmpl-{reply.id}",
        "object": "text_completion",
        "created": reply.created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}],
        "usage": use,
    }


def completion_chunk(reply: Reply, model: str, text: str, finish: str | None) -> dict[str, Any]:
    return {
        "id": f"cmpl-{reply.id}",
        "object": "text_completion",
        "created": reply.created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
    }


def chat_response(reply: Reply, model: str, text: str, finish: str, use: dict) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{reply.id}",
        "object": "chat.completion",
        "created": reply.created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
        "usage": use,
    }


def chat_chunk(reply: Reply, model: str, delta: dict[str, str], finish: str | None) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{reply.id}",
        "object": "chat.completion.chunk",
        "created": reply.created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def usage_chunk(reply: Reply, model: str, obj: str, use: dict) -> dict[str, Any]:
    prefix = "chatcmpl" if obj.startswith("chat") else "cmpl"
    return {
        "id": f"{prefix}-{reply.id}",
        "object": obj,
        "created": reply.created,
        "model": model,
        "choices": [],
        "usage": use,
    }


def sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"
