"""``FleetIngress``: the OpenAI-compatible HTTP API (FastAPI on Serve).

Per request: body size (413 from ``Content-Length`` before a byte of the body is read) → bearer
key → company (401; a per-address limit on key checks, 429) → the company's rate and its requests
in flight (429 with ``Retry-After``) → the body, read up to ``serve.max_body_bytes`` (413 past
it) → parsed, validated and tokenized in a worker thread, at most two bodies per company at a
time (400; 413 past the context) → model id → active stack (404, the same for unknown and
foreign models) → the model deployment, routed by the stack (``route_id``) as Serve's
multiplexed model id. The event loop never parses or tokenizes, so ``/healthz`` and every other
request go on while big bodies arrive. The response names the stack that answered in
``X-Fleet-Served-By``. Errors use OpenAI's JSON shape; registry or store trouble is a 503, never
a 500. A replica that dies before answering is retried on another; a stream whose replica dies
continues on another from the tokens already sent.
"""

import asyncio
import hashlib
import logging
import time
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from fleet.errors import FleetError, OverloadedError, RateLimitError, UnavailableError, ValidationError
from fleet.registry import Registry, Stack
from fleet.serve import protocol as p
from fleet.serve.messages import Completion, ReplicaRequest, StreamDelta, StreamEnd
from fleet.serve.metrics import ServeMetrics
from fleet.serve.runtime import config_from_args, context_limit, encode_chat, encode_prompt, load_tokenizer
from fleet.serve.tenancy import RateLimiter, Tenancy
from fleet.types import level_of

log = logging.getLogger("fleet.serve")
INGRESS_DEPLOYMENT = "FleetIngress"
SERVED_BY = "X-Fleet-Served-By"
HEALTH_PATH = "/healthz"
RETRY_DELAYS_S = (0.05, 0.2, 0.5, 1.0, 2.0)
PARSE_THREADS = 2  # worker threads that parse and tokenize request bodies
PARSE_PER_COMPANY = 2  # bodies of one company parsed at a time: the others' wait is bounded


@dataclass
class Prepared:
    """A request body parsed, validated and tokenized (in a worker thread)."""

    body: Any
    ids: list[int]
    max_tokens: int
    echo: str = ""


def _retryable() -> tuple[type[BaseException], ...]:
    """Errors that mean "that replica is gone", not "this request is bad": try another replica."""
    from ray import exceptions as rex
    from ray.serve import exceptions as sex

    kinds = [rex.RayActorError, sex.ReplicaUnavailableError, sex.DeploymentUnavailableError]
    for name in ("ActorDiedError", "ActorUnavailableError"):
        if hasattr(rex, name):
            kinds.append(getattr(rex, name))
    return tuple(kinds)


def route_id(stack: Stack) -> str:
    """Serve's multiplexed model id for a stack: a digest of ``stack.key`` (the stack's versions).

    The same stack always gets the same id, so routing prefers replicas that hold it, and a
    promotion changes it. A digest rather than the key itself because Ray Serve exports the ids
    a replica holds as a metric label (serve_registered_multiplexed_model_id), and model ids
    (tenant names) must not reach metrics.
    """
    return "stack-" + hashlib.sha256(stack.key.encode()).hexdigest()[:32]


def as_fleet_error(exc: BaseException) -> FleetError | None:
    """The FleetError behind an exception from the model deployment, if any."""
    from ray.serve.exceptions import BackPressureError

    if isinstance(exc, FleetError):
        return exc
    cause = getattr(exc, "cause", None)
    if isinstance(cause, FleetError):
        return cause
    if isinstance(exc, BackPressureError):
        return OverloadedError("the model deployment's queue is full; retry shortly")
    return None


# ---------------------------------------------------------------------- OpenAPI
_SCHEMA_DEFS: dict[str, Any] = {}


def _body_schema(model: type) -> dict[str, Any]:
    """openapi_extra for a route that reads its JSON body itself (auth comes before validation)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    _SCHEMA_DEFS.update(schema.pop("$defs", {}))
    _SCHEMA_DEFS[model.__name__] = schema
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


app = FastAPI(
    title="fleet",
    description="OpenAI-compatible API over a fleet of personalized LoRA models; `model` is a fleet model id.",
    version="1",
    docs_url=None,
    redoc_url=None,
)


def _openapi() -> dict[str, Any]:
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = schema.setdefault("components", {})
        components.setdefault("schemas", {}).update(_SCHEMA_DEFS)
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        schema["security"] = [{"bearer": []}]
        app.openapi_schema = schema
    return app.openapi_schema


app.openapi = _openapi  # type: ignore[method-assign]


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(p.error_body(exc.status_code, str(exc.detail), None), status_code=exc.status_code)


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s", request.url.path)
    return JSONResponse(p.error_body(500, "internal error", None), status_code=500)


@serve.deployment(name=INGRESS_DEPLOYMENT)
@serve.ingress(app)
class FleetIngress:
    def __init__(self, model: DeploymentHandle, args: dict[str, Any] | None = None) -> None:
        cfg = config_from_args(args)
        s = cfg.serve
        self.cfg = cfg
        self.model = model
        self.tokenizer = load_tokenizer(cfg)
        self.context_limit = context_limit(cfg, self.tokenizer)
        # A text longer than this cannot fit the context whatever it tokenizes to: 413 untokenized.
        self.max_prompt_chars = 2 * self.context_limit * max(len(t) for t in self.tokenizer.get_vocab())
        preauth = RateLimiter(s.preauth_rps, s.preauth_burst, label="key checks from this client address")
        self.tenancy = Tenancy(
            Registry.open(cfg, migrate=False),
            cache_s=s.stack_cache_s,
            bad_key_s=s.bad_key_cache_s,
            preauth=preauth,
        )
        self.limiter = RateLimiter(s.rate_limit_rps, s.rate_limit_burst, s.company_rate_limits)
        self.metrics = ServeMetrics(INGRESS_DEPLOYMENT)
        self._retryable = _retryable()
        self._inflight: Counter[str] = Counter()
        self._duration: dict[str, float] = {}  # company → recent request duration, s (Retry-After)
        self._parse_pool = ThreadPoolExecutor(PARSE_THREADS, thread_name_prefix="fleet-parse")
        self._parse_gates: dict[str, asyncio.Semaphore] = {}

    # ------------------------------------------------------------------ routes
    @app.get(HEALTH_PATH)
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok", "base": self.cfg.base.name}

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> Response:
        try:
            company = await self._admit(request)
            models = await self.tenancy.models(company)
            data = [self._model_card(m) for m in models]
            return JSONResponse({"object": "list", "data": data})
        except FleetError as exc:
            return self._error(exc, "unknown", time.perf_counter())

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(self, model_id: str, request: Request) -> Response:
        try:
            company = await self._admit(request)
            return JSONResponse(self._model_card(await self.tenancy.model(company, model_id)))
        except FleetError as exc:
            return self._error(exc, "unknown", time.perf_counter())

    @app.post("/v1/completions", openapi_extra=_body_schema(p.CompletionRequest))
    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    @app.post("/v1/chat/completions", openapi_extra=_body_schema(p.ChatRequest))
    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def _generate(self, request: Request, *, chat: bool) -> Response:
        t0, tier, release = time.perf_counter(), "unknown", None
        try:
            self._check_length(request)
            company = await self._admit(request)
            release = self._enter(company)
            prep = await self._prepare(company, await self._read_body(request), chat=chat)
            body = prep.body
            stack = await self.tenancy.stack(company, body.model)
            tier = level_of(body.model).value
            logprobs = None if chat else body.logprobs
            payload = self._payload(
                body, stack, prep, company, logprobs=logprobs, echo=not chat and body.echo
            )
            reply = p.Reply()
            if body.stream:
                response = await self._stream(
                    stack,
                    payload,
                    body,
                    reply,
                    tier,
                    t0,
                    len(prep.ids),
                    echo=prep.echo,
                    chat=chat,
                    release=release,
                )
                release = None  # the stream lets go when it ends
                return response
            out = await self._call(stack, payload)
            use = p.usage(len(prep.ids), out.completion_tokens)
            if chat:
                result = p.chat_response(reply, body.model, out.text, out.finish_reason, use)
            else:
                text = prep.echo + out.text
                result = p.completion_response(reply, body.model, text, out.finish_reason, out.logprobs, use)
            self.metrics.request(
                tier, 200, time.perf_counter() - t0, ttft_s=out.ttft_s,
                prompt_tokens=len(prep.ids), completion_tokens=out.completion_tokens,
            )  # fmt: skip
            return JSONResponse(result, headers={SERVED_BY: out.served_by})
        except FleetError as exc:
            return self._error(exc, tier, t0)
        finally:
            if release is not None:
                release()

    # ------------------------------------------------------------------ steps
    async def _admit(self, request: Request) -> str:
        client = request.client.host if request.client else None
        company = await self.tenancy.company(request.headers.get("authorization"), client)
        self.limiter.check(company)
        return company

    def _check_length(self, request: Request) -> None:
        """413 from the declared length, before any of the body is read."""
        declared = request.headers.get("content-length")
        if declared is None:
            return
        if not declared.strip().isdigit():
            raise ValidationError("invalid Content-Length header")
        if int(declared) > self.cfg.serve.max_body_bytes:
            raise p.BodyTooLargeError(
                f"the request body has {int(declared)} bytes; the limit is {self.cfg.serve.max_body_bytes}"
            )

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused (413) as soon as it passes the limit (a chunked body declares no length)."""
        limit, parts, size = self.cfg.serve.max_body_bytes, [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise p.BodyTooLargeError(f"the request body is larger than the limit of {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    def _enter(self, company: str) -> Callable[[], None]:
        """Count a request of ``company`` in flight (429 past its limit); returns the release."""
        s = self.cfg.serve
        limit = s.company_inflight_limits.get(company, s.max_inflight_per_company) * max(1, s.max_replicas)
        if self._inflight[company] >= limit:
            # When to come back: about when the requests in flight now are done (their recent duration).
            wait = min(30.0, max(1.0, self._duration.get(company, 1.0)))
            raise RateLimitError(
                f"too many requests in flight for company {company!r} (limit {limit}); retry in {wait:.0f}s",
                retry_after=wait,
            )
        self._inflight[company] += 1
        done, t0 = False, time.perf_counter()

        def release() -> None:
            nonlocal done
            if not done:
                done = True
                self._inflight[company] -= 1
                if self._inflight[company] <= 0:
                    del self._inflight[company]
                took = time.perf_counter() - t0
                self._duration[company] = 0.8 * self._duration.get(company, took) + 0.2 * took

        return release

    async def _prepare(self, company: str, raw: bytes, *, chat: bool) -> Prepared:
        """Parse, validate and tokenize in a worker thread; a company waits for its own bodies only."""
        gate = self._parse_gates.get(company)
        if gate is None:
            gate = self._parse_gates[company] = asyncio.Semaphore(PARSE_PER_COMPANY)
        async with gate:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._parse_pool, self._prepare_sync, raw, chat)

    def _prepare_sync(self, raw: bytes, chat: bool) -> Prepared:
        if chat:
            body = p.parse(p.ChatRequest, raw).checked()
            messages = body.template_messages()
            self._check_chars(sum(len(m["content"]) for m in messages))
            ids = encode_chat(self.tokenizer, messages)
            max_tokens = self._max_tokens(
                body.max_completion_tokens or body.max_tokens, len(ids), default=None
            )
            return Prepared(body, ids, max_tokens)
        body = p.parse(p.CompletionRequest, raw, max_ids=self.context_limit).checked()
        prompt = body.single_prompt()
        if isinstance(prompt, str):
            self._check_chars(len(prompt))
        ids = encode_prompt(self.tokenizer, prompt)
        max_tokens = self._max_tokens(body.max_tokens, len(ids), default=16)
        if max_tokens == 0 and not body.echo:
            raise ValidationError("max_tokens=0 needs echo=true (score the prompt)", param="max_tokens")
        if body.stream and max_tokens == 0:
            raise ValidationError("stream=true needs max_tokens >= 1", param="max_tokens")
        echo = ""
        if body.echo:
            echo = prompt if isinstance(prompt, str) else self.tokenizer.decode(ids, skip_special_tokens=True)
        return Prepared(body, ids, max_tokens, echo)

    def _check_chars(self, n: int) -> None:
        if n > self.max_prompt_chars:
            raise p.ContextLengthError(
                f"the prompt has {n} characters; it cannot fit this model's context of "
                f"{self.context_limit} tokens",
                param="prompt",
            )

    def _model_card(self, m: Any) -> dict[str, Any]:
        return {
            "id": m.id,
            "object": "model",
            "created": int(m.created_at),
            "owned_by": m.company_id,
            "tier": m.tier,
            "base_model": m.base_model,
            "active_version": m.active_version,
        }

    def _max_tokens(self, requested: int | None, prompt_len: int, *, default: int | None) -> int:
        """max_tokens checked against the serving ceiling; shortened to what the context has left."""
        room = self.context_limit - prompt_len
        if room < 1:
            raise p.ContextLengthError(
                f"the prompt has {prompt_len} tokens; this model's context is {self.context_limit} tokens "
                "(prompt and completion together)",
                param="prompt",
            )
        ceiling = self.cfg.serve.max_new_tokens
        if requested is not None and requested > ceiling:
            raise ValidationError(f"max_tokens must be at most {ceiling}", param="max_tokens")
        if requested is None:
            requested = ceiling if default is None else default
        return min(requested, room)

    def _payload(
        self, body: Any, stack: Stack, prep: Prepared, company: str, *, logprobs, echo: bool
    ) -> ReplicaRequest:
        return ReplicaRequest.of(
            stack.entries,
            prep.ids,
            prep.max_tokens,
            company=company,
            temperature=float(body.temperature),
            top_p=float(body.top_p),
            stop=body.stop_list(),
            seed=body.seed,
            logprobs=logprobs,
            echo=echo,
        )

    async def _call(self, stack: Stack, payload: ReplicaRequest) -> Completion:
        handle = self.model.options(multiplexed_model_id=route_id(stack))
        for delay in (*RETRY_DELAYS_S, None):
            try:
                return await handle.generate.remote(payload)
            except Exception as exc:
                self._raise_unless_retryable(exc, delay)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _open_stream(self, stack: Stack, payload: ReplicaRequest):
        handle = self.model.options(multiplexed_model_id=route_id(stack), stream=True)
        for delay in (*RETRY_DELAYS_S, None):
            gen = handle.stream.remote(payload)
            try:
                return gen, await gen.__anext__()
            except StopAsyncIteration:
                raise UnavailableError("the model replica closed the stream before answering") from None
            except Exception as exc:
                self._raise_unless_retryable(exc, delay)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def _raise_unless_retryable(self, exc: Exception, delay: float | None) -> None:
        err = as_fleet_error(exc)
        if err is not None:
            raise err
        if not isinstance(exc, self._retryable):
            raise exc
        if delay is None:
            raise UnavailableError(f"no model replica could answer: {type(exc).__name__}") from None
        log.warning("model replica unavailable (%s); retrying in %.2fs", type(exc).__name__, delay)

    async def _stream(
        self, stack: Stack, payload: ReplicaRequest, body: Any, reply: p.Reply, tier: str, t0: float, n_prompt: int,
        *, echo: str, chat: bool, release: Callable[[], None],
    ) -> Response:  # fmt: skip
        gen, first = await self._open_stream(stack, payload)
        model = body.model

        def chunk(text: str, finish: str | None = None) -> bytes:
            if chat:
                return p.sse(
                    p.chat_chunk(reply, model, {"content": text} if text or not finish else {}, finish)
                )
            return p.sse(p.completion_chunk(reply, model, text, finish))

        async def events() -> AsyncIterator[bytes]:
            nonlocal gen
            status, ttft, n_out, finished = 200, None, 0, False
            ids: list[int] = []  # generated so far, and the text sent for them: enough to resume
            sent = ""
            resumes = 0
            try:
                if chat:
                    yield p.sse(p.chat_chunk(reply, model, {"role": "assistant", "content": ""}, None))
                if echo:
                    yield chunk(echo)
                while not finished:
                    try:
                        async for item in gen:
                            text = getattr(item, "text", "")
                            if text:
                                ttft = ttft if ttft is not None else time.perf_counter() - t0
                                sent += text
                                yield chunk(text)
                            if isinstance(item, StreamDelta):
                                ids.extend(item.ids)
                            elif isinstance(item, StreamEnd):
                                finished, n_out = True, item.completion_tokens
                                yield chunk("", item.finish_reason)
                                if body.include_usage:
                                    obj = "chat.completion.chunk" if chat else "text_completion"
                                    yield p.sse(p.usage_chunk(reply, model, obj, p.usage(n_prompt, n_out)))
                                break
                        else:
                            raise UnavailableError("the model replica ended the stream without finishing it")
                    except Exception as exc:
                        # The replica went away mid-stream: continue on another from the tokens sent so far.
                        if (
                            as_fleet_error(exc) is not None
                            or not isinstance(exc, self._retryable)
                            or resumes >= 2
                        ):
                            raise
                        resumes += 1
                        log.warning(
                            "model replica lost mid-stream (%s); resuming on another", type(exc).__name__
                        )
                        gen, _ = await self._open_stream(stack, payload.resumed(ids, sent))
                yield p.SSE_DONE
            except Exception as exc:  # the stream has started: report in-band, as OpenAI does
                err = as_fleet_error(exc) or UnavailableError(f"the stream failed: {type(exc).__name__}")
                status, body_ = p.error_of(err)
                log.warning("stream ended with %s: %s", status, err.message)
                yield p.sse(body_)
            finally:
                if not finished:
                    gen.cancel()
                release()
                self.metrics.request(
                    tier,
                    status,
                    time.perf_counter() - t0,
                    ttft_s=ttft,
                    prompt_tokens=n_prompt,
                    completion_tokens=n_out,
                )

        body_iter = events()
        # Starlette may never start the generator (the client left first): release its slot then too.
        weakref.finalize(body_iter, release)
        return StreamingResponse(
            body_iter,
            media_type="text/event-stream",
            headers={SERVED_BY: first.served_by, "Cache-Control": "no-cache"},
        )

    def _error(self, exc: FleetError, tier: str, t0: float) -> JSONResponse:
        status, body = p.error_of(exc)
        if status >= 500:
            log.warning("request failed with %s: %s", status, exc.message)
        self.metrics.request(tier, status, time.perf_counter() - t0)
        headers = {}
        retry = exc.context.get("retry_after") if isinstance(exc.context, dict) else None
        if retry is not None:
            headers["Retry-After"] = str(max(1, int(retry + 0.999)))
        return JSONResponse(body, status_code=status, headers=headers)
