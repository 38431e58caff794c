"""`llamaforge serve`: load the models, build the app, run it on uvicorn until SIGINT / SIGTERM.

On a signal the engines stop first, so that every stream in flight ends with an error event
instead of holding the shutdown until it finishes, then uvicorn closes."""
from __future__ import annotations

import os
import sys
import time

from ..errors import LlamaforgeError
from .api import create_app
from .metrics import Metrics
from .registry import load_models


def parse_names(names: list[str]) -> list[tuple[str, str]]:
    out = []
    for item in names:
        alias, sep, model = item.partition("=")
        if not sep or not alias or not model:
            raise LlamaforgeError(f"--name {item!r}: expected ALIAS=MODEL")
        out.append((alias, model))
    return out


def build(models: list[str], names: list[str] = (), api_key: str | None = None, max_batch: int = 16,
          max_queue: int = 64, ctx: int | None = None, dtype: str = "bf16", quantize: str = "auto",
          compile: bool = False, device: str = "auto", kv_cache: str = "bf16"):
    """(the FastAPI app, the scheduler that runs its models): what `serve` runs."""
    specs = [(None, m) for m in models] + parse_names(list(names))
    if not specs:
        specs = [(None, "default")]
    if max_batch < 1 or max_queue < 0:
        raise LlamaforgeError("--max-batch must be at least 1 and --max-queue at least 0")
    metrics = Metrics()
    served, scheduler = load_models(specs, dtype=dtype, quantize=quantize, ctx=ctx, max_batch=max_batch,
                                    max_queue=max_queue, compile=compile, on_step=metrics.step, device=device,
                                    kv_cache=kv_cache)
    return create_app(served, api_key=api_key, metrics=metrics), scheduler


def serve(models: list[str], host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 16, max_queue: int = 64, ctx: int | None = None, dtype: str = "bf16",
          quantize: str = "auto", compile: bool = False, names: list[str] = (), device: str = "auto",
          kv_cache: str = "bf16"):
    import uvicorn
    started = time.perf_counter()
    api_key = api_key or os.environ.get("LLAMAFORGE_API_KEY") or None
    app, scheduler = build(models, names, api_key, max_batch, max_queue, ctx, dtype, quantize, compile, device,
                           kv_cache)
    served = app.state.models

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:   # listening now: tell the user (stderr) and scripts (stdout)
                print(f"llamaforge: serving {', '.join(f'{n} ({m.kind})' for n, m in served.items())} on "
                      f"http://{host}:{port} (OpenAI API at /v1, playground at /; ready in "
                      f"{time.perf_counter() - started:.1f} s{', API key required' if api_key else ''})",
                      file=sys.stderr, flush=True)
                print(f"http://{host}:{port}/v1", flush=True)

        def handle_exit(self, sig, frame):
            scheduler.shutdown("the server is shutting down")
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    Server(config).run()
