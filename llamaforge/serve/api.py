"""The OpenAI-compatible HTTP API: request schemas (pydantic), endpoints (FastAPI), server-sent
events for streams, OpenAI's error objects, Prometheus metrics, and the playground page.

    POST /v1/chat/completions   POST /v1/completions   POST /v1/embeddings   POST /v1/classify
    GET  /v1/models             GET  /health           GET  /metrics          GET  /  (playground)
"""
from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from .. import __version__
from ..errors import LlamaforgeError
from ..model.constrained import JSONConstraint
from ..model.generation import SamplingConfig
from .engine import Event, QueueFull
from .engine import Request as EngineRequest
from .metrics import Metrics
from .registry import Served

PLAYGROUND = Path(__file__).parent / "playground"


# --- request schemas -----------------------------------------------------------------------------
# Unknown fields are refused, as OpenAI refuses them; the extras vLLM and llama.cpp's server accept
# (ignore_eos, min_tokens, top_k, min_p, repetition_penalty) are known here.

class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ContentPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class JSONSchemaFormat(Strict):
    name: str = "response"
    schema_: dict | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StreamOptions(Strict):
    include_usage: bool = False


class Sampling(Strict):
    model: str
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    top_k: int | None = Field(default=None, ge=1)
    min_p: float | None = Field(default=None, ge=0, lt=1)
    repetition_penalty: float = Field(default=1.0, gt=0)

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise ApiError(400, "stop: at most 4 sequences", "stop")
        return stops


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    suffix: None = None


class EmbeddingRequest(Strict):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class ClassifyRequest(Strict):
    model: str
    input: str | list[str]
    user: str | None = None


# --- errors --------------------------------------------------------------------------------------

class ApiError(Exception):
    """An OpenAI error object with its HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _validation_error(exc: RequestValidationError) -> ApiError:
    first = exc.errors()[0] if exc.errors() else {}
    where = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(where) or None
    if first.get("type") == "json_invalid":
        return ApiError(400, "We could not parse the JSON body of your request: it is not valid JSON.")
    if first.get("type") == "extra_forbidden":
        return ApiError(400, f"Unrecognized request argument supplied: {where[-1] if where else '?'}", param)
    return ApiError(400, f"{param or 'body'}: {first.get('msg', 'invalid value')}", param)


# --- the app -------------------------------------------------------------------------------------

class AuthAndCount:
    """For /v1 requests: the API key checked (401 without it), and each answer's status counted.
    Plain ASGI: Starlette's @app.middleware("http") passes a streamed body through a task and a
    queue of its own, one more hop for every token of every stream."""

    def __init__(self, app, api_key: str | None, metrics: Metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        path = scope["path"]
        if self.api_key:
            given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if given != f"Bearer {self.api_key}":
                self.metrics.request(path, 401)
                err = ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
                return await JSONResponse(err.body(), status_code=401)(scope, receive, send)

        async def counted(message):
            if message["type"] == "http.response.start":
                self.metrics.request(path, message["status"])
            await send(message)
        await self.app(scope, receive, counted)


def create_app(models: dict[str, Served], api_key: str | None = None, metrics: Metrics | None = None) -> FastAPI:
    app = FastAPI(title="llamaforge", version=__version__, docs_url=None, redoc_url=None)
    metrics = metrics or Metrics()
    app.state.models, app.state.metrics = models, metrics

    @app.exception_handler(ApiError)
    async def api_error(_, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, exc: RequestValidationError):
        err = _validation_error(exc)
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(LlamaforgeError)
    async def llamaforge_error(_, exc: LlamaforgeError):
        return JSONResponse(ApiError(400, str(exc)).body(), status_code=400)

    app.add_middleware(AuthAndCount, api_key=api_key, metrics=metrics)

    def served(name: str, kind: str = "lm") -> Served:
        m = models.get(name)
        if m is None:
            raise ApiError(404, f"The model `{name}` does not exist", "model", "model_not_found")
        if m.kind != kind:
            what = "a classifier: use /v1/classify" if m.kind == "classifier" else "a language model, not a classifier"
            raise ApiError(400, f"The model `{name}` is {what}", "model")
        return m

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": m.name, "object": "model", "created": m.created, "owned_by": "llamaforge",
                                             "kind": m.kind} for m in models.values()]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(models)}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        m = served(body.model)
        tok = m.tokenizer
        prompt = tok.encode(tok.apply_chat_template([{"role": "system" if x.role == "developer" else x.role,
                                                      "content": x.text()} for x in body.messages]),
                            add_special_tokens=False)
        constraint = _constraint(body.response_format)
        top = body.top_logprobs if body.logprobs else None
        if body.top_logprobs and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        limit = body.max_completion_tokens or body.max_tokens
        jobs = _submit(m, [prompt] * body.n, body, limit, top, constraint, metrics, chat=True)
        return await _respond(request, body, m, jobs, chat=True, prompt_tokens=len(prompt))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        m = served(body.model)
        prompts = _prompts(body.prompt, m.tokenizer)
        jobs = _submit(m, [p for p in prompts for _ in range(body.n)], body, body.max_tokens, body.logprobs, None, metrics)
        echo = [m.tokenizer.decode(p, skip_special_tokens=True) if body.echo else "" for p in prompts for _ in range(body.n)]
        return await _respond(request, body, m, jobs, chat=False, prompt_tokens=sum(len(p) for p in prompts), echo=echo)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        m = served(body.model)
        texts = _prompts(body.input, m.tokenizer)
        if body.dimensions is not None:
            raise ApiError(400, "dimensions: llamaforge returns the model's hidden size only", "dimensions")
        vectors = await _job(m, lambda: _embed(m, texts))
        data = [{"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
                for i, v in enumerate(vectors)]
        n = sum(len(t) for t in texts)
        return {"object": "list", "data": data, "model": m.name, "usage": {"prompt_tokens": n, "total_tokens": n}}

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest):
        m = served(body.model, "classifier")
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or any(not t.strip() for t in texts):
            raise ApiError(400, "input: give one or more non-empty texts", "input")
        probs, n = await _job(m, lambda: _classify(m, texts))
        labels = m.classifier[1]
        data = [{"index": i, "label": labels[int(p.argmax())], "probs": [round(float(x), 6) for x in p],
                 "labels": labels, "num_classes": len(labels)} for i, p in enumerate(probs)]
        return {"id": f"classify-{uuid.uuid4().hex[:24]}", "object": "list", "created": int(time.time()),
                "model": m.name, "data": data, "usage": {"prompt_tokens": n, "total_tokens": n}}

    @app.get("/")
    async def playground():
        return FileResponse(PLAYGROUND / "index.html")

    app.mount("/playground", StaticFiles(directory=PLAYGROUND), name="playground")
    return app


# --- generation requests -------------------------------------------------------------------------

class Job:
    """One engine request's results as they come: an asyncio queue of Events (counted in the
    metrics as they pass)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, metrics: Metrics):
        self.loop, self.events, self.metrics = loop, asyncio.Queue(), metrics
        self.request: EngineRequest | None = None
        self.tokens = 0

    def emit(self, event: Event):   # called on the engine's thread
        if event.token is not None:
            r = self.request
            self.metrics.token(r.first_token_at - r.arrived if self.tokens == 0 and r.first_token_at else None)
            self.tokens += 1
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


def _constraint(fmt: ResponseFormat | None) -> JSONConstraint | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return JSONConstraint({"type": "object"})
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise ApiError(400, "response_format.json_schema.schema is required", "response_format.json_schema")
    try:
        return JSONConstraint(fmt.json_schema.schema_)
    except LlamaforgeError as e:
        raise ApiError(400, str(e), "response_format.json_schema.schema") from None


def _prompts(prompt, tok) -> list[list[int]]:
    """A prompt (string, strings, token ids, lists of ids) as token id lists, none empty."""
    if isinstance(prompt, str):
        prompts = [tok.encode(prompt)]
    elif prompt and all(isinstance(x, int) for x in prompt):
        prompts = [list(prompt)]
    else:
        prompts = [tok.encode(p) if isinstance(p, str) else list(p) for p in prompt]
    if not prompts or any(not p for p in prompts):
        raise ApiError(400, "prompt: give a non-empty prompt", "prompt")
    if any(t < 0 or t >= tok.vocab_size for p in prompts for t in p):
        raise ApiError(400, "prompt: a token id is out of the vocabulary", "prompt")
    return prompts


def _submit(m: Served, prompts: list[list[int]], body: Sampling, max_tokens: int | None, logprobs: int | None,
            constraint: JSONConstraint | None, metrics: Metrics, chat: bool = False) -> list[Job]:
    engine = m.runner
    loop = asyncio.get_running_loop()
    jobs = []
    for i, prompt in enumerate(prompts):
        room = engine.ctx - len(prompt)
        limit = max_tokens if max_tokens is not None else room
        if len(prompt) + limit > engine.ctx:
            raise ApiError(400, f"This model's maximum context length is {engine.ctx} tokens. However, you requested "
                                f"{len(prompt) + limit} tokens ({len(prompt)} in the {'messages' if chat else 'prompt'}, "
                                f"{limit} in the completion). Please reduce the length.", "max_tokens",
                           "context_length_exceeded")
        cfg = SamplingConfig(max_new_tokens=limit, temperature=1.0 if body.temperature is None else body.temperature,
                             top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
                             repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
                             frequency_penalty=body.frequency_penalty, stop=body.stops(), ignore_eos=body.ignore_eos,
                             seed=None if body.seed is None else body.seed + i)
        job = Job(loop, metrics)
        job.request = EngineRequest(prompt, cfg, job.emit, min_tokens=body.min_tokens, logprobs=logprobs,
                                    constraint=JSONConstraint(constraint.schemas.root) if constraint else None,
                                    adapter=m.adapter)
        jobs.append(job)
    try:
        for job in jobs:
            engine.submit(job.request)
    except QueueFull:
        for job in jobs:
            job.request.cancelled = True
        raise ApiError(429, "The server is busy: too many requests are waiting. Retry shortly.",
                       code="rate_limit_exceeded", kind="requests", headers={"Retry-After": "1"}) from None
    metrics.prompt_tokens(sum(len(p) for p in prompts))
    return jobs


async def _respond(http: Request, body, m: Served, jobs: list[Job], chat: bool, prompt_tokens: int,
                   echo: list[str] | None = None):
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    if body.stream:
        return StreamingResponse(_stream(http, body, m, jobs, chat, rid, created, prompt_tokens, echo),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        outputs = await asyncio.gather(*(_collect(j) for j in jobs))
    except asyncio.CancelledError:
        for j in jobs:
            j.request.cancelled = True
        raise
    failed = next((o for o in outputs if o["finish"] == "error"), None)
    if failed:
        raise ApiError(failed["status"], f"generation failed: {failed['error']}", kind="server_error")
    completion = sum(len(o["tokens"]) for o in outputs)
    choices = []
    for i, o in enumerate(outputs):
        if chat:
            choices.append({"index": i, "message": {"role": "assistant", "content": o["text"]},
                            "logprobs": {"content": [_chat_logprob(m.tokenizer, e) for e in o["events"]]}
                            if body.logprobs else None, "finish_reason": o["finish"]})
        else:
            text = (echo[i] if echo else "") + o["text"]
            choices.append({"index": i, "text": text, "finish_reason": o["finish"],
                            "logprobs": _legacy_logprobs(m.tokenizer, o["events"], len(echo[i]) if echo else 0)
                            if body.logprobs is not None else None})
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created, "model": m.name,
            "system_fingerprint": f"llamaforge-{__version__}", "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                      "total_tokens": prompt_tokens + completion}}


async def _collect(job: Job) -> dict:
    events, text = [], ""
    while True:
        e = await job.events.get()
        text += e.text
        if e.token is not None:
            events.append(e)
        if e.finish:
            return {"text": text, "events": events, "tokens": [x.token for x in events], "finish": e.finish,
                    "error": e.error, "status": e.status}


async def _stream(http: Request, body, m: Served, jobs: list[Job], chat: bool, rid: str, created: int,
                  prompt_tokens: int, echo: list[str] | None):
    """Server-sent events: one chunk per text piece of any choice, a last chunk per choice with its
    finish reason, the usage when asked, then [DONE]. A client that goes away cancels its requests."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices, usage=None):
        data = {"id": rid, "object": kind, "created": created, "model": m.name,
                "system_fingerprint": f"llamaforge-{__version__}", "choices": choices}
        if usage is not None:
            data["usage"] = usage
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    completion, open_jobs = 0, set(range(len(jobs)))
    merged: asyncio.Queue = asyncio.Queue()

    async def forward(i, job):
        while True:
            e = await job.events.get()
            await merged.put((i, e))
            if e.finish:
                return

    async def only_job():   # n = 1: its own queue, no task to merge the choices' events
        return 0, await jobs[0].events.get()
    tasks = [asyncio.create_task(forward(i, j)) for i, j in enumerate(jobs)] if len(jobs) > 1 else []
    next_event = merged.get if tasks else only_job
    try:
        for i in range(len(jobs)):
            if chat:
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            elif echo and echo[i]:
                yield chunk([{"index": i, "text": echo[i], "logprobs": None, "finish_reason": None}])
        while open_jobs:
            i, e = await next_event()
            if e.finish == "error":
                yield f"data: {json.dumps(ApiError(e.status, e.error or 'generation failed', kind='server_error').body())}\n\n"
                open_jobs.discard(i)
                continue
            if e.token is not None:
                completion += 1
            if e.text or e.token is not None:
                if chat:
                    lp = {"content": [_chat_logprob(m.tokenizer, e)]} if body.logprobs and e.token is not None else None
                    yield chunk([{"index": i, "delta": {"content": e.text}, "logprobs": lp, "finish_reason": None}])
                else:
                    lp = _legacy_logprobs(m.tokenizer, [e], 0) if body.logprobs is not None and e.token is not None else None
                    yield chunk([{"index": i, "text": e.text, "logprobs": lp, "finish_reason": None}])
            if e.finish:
                open_jobs.discard(i)
                last = {"delta": {}} if chat else {"text": ""}
                yield chunk([{"index": i, **last, "logprobs": None, "finish_reason": e.finish}])
        if body.stream_options and body.stream_options.include_usage:
            yield chunk([], {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                             "total_tokens": prompt_tokens + completion})
        yield "data: [DONE]\n\n"
    finally:   # finished, or the client went away: nothing more is computed for it
        for j in jobs:
            j.request.cancelled = True
        for t in tasks:
            t.cancel()


def _chat_logprob(tok, e: Event) -> dict:
    table = tok.token_bytes()

    def one(token, logprob):
        return {"token": tok.decode([token]), "logprob": logprob, "bytes": list(table[token] or b"")}
    return {**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top_logprobs]}


def _legacy_logprobs(tok, events: list[Event], offset: int) -> dict:
    tokens, logprobs, top, offsets = [], [], [], []
    for e in events:
        piece = tok.decode([e.token])
        offsets.append(offset)
        offset += len(e.text)
        tokens.append(piece)
        logprobs.append(e.logprob)
        top.append({tok.decode([t]): lp for t, lp in e.top_logprobs} if e.top_logprobs else None)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top, "text_offset": offsets}


# --- jobs on the model's thread ------------------------------------------------------------------

async def _job(m: Served, work):
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def done(result, error):
        loop.call_soon_threadsafe(lambda: future.done() or (future.set_exception(error) if error
                                                             else future.set_result(result)))
    m.runner.run_job(work, done)
    return await future


def _embed(m: Served, prompts: list[list[int]]):
    """Mean of the last hidden states over each text's tokens, L2-normalised."""
    import torch
    model = m.runner.model
    if len(prompts) and max(len(p) for p in prompts) > m.runner.ctx:
        raise ApiError(400, f"input: longer than the model's context of {m.runner.ctx} tokens", "input")
    out = []
    for p in prompts:
        m.runner.adapter_rows.rows = torch.tensor([m.adapter])
        h = model.hidden_states(torch.tensor([p], device=model.embed_tokens.weight.device))[0].float()
        out.append(torch.nn.functional.normalize(h.mean(0), dim=0).tolist())
    return out


def _classify(m: Served, texts: list[str]):
    from ..data.labelled import LabelledText, encode_texts
    from ..train.classify import predict_proba
    clf, labels, cfg = m.classifier
    seqs = encode_texts(m.tokenizer, [LabelledText(t, None, None, f"input {i + 1}") for i, t in enumerate(texts)],
                        cfg.max_length, name="input", report=False, truncation_side=cfg.truncation_side)
    return predict_proba(clf, seqs, m.tokenizer.pad_id, 64), sum(len(s) for s in seqs)


def _encode(vector: list[float], fmt: str) -> Any:
    if fmt == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
