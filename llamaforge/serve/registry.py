"""The models a server serves, by alias: each MODEL given to `llamaforge serve` becomes a language
model on a scheduler of its own, a LoRA adapter on the scheduler of its base (several adapters of
one base share its weights), or a classifier."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import LlamaforgeError
from ..formats.load import load
from ..formats.paths import adapter_config, classifier_labels, model_kind, resolve_model_path, run_model_path
from ..model.adapters import AdapterRows, add_served_adapter
from .engine import Engine


class Worker:
    """A thread that runs jobs one at a time (a classifier's; an Engine runs its own)."""

    def __init__(self):
        self._jobs: list[tuple[Callable, Callable]] = []
        self._wake = threading.Condition()
        self._running = True
        threading.Thread(target=self._loop, name="llamaforge-worker", daemon=True).start()

    def run_job(self, work: Callable, done: Callable):
        with self._wake:
            self._jobs.append((work, done))
            self._wake.notify()

    def shutdown(self, reason: str = ""):
        with self._wake:
            self._running = False
            self._wake.notify()

    def _loop(self):
        while True:
            with self._wake:
                while self._running and not self._jobs:
                    self._wake.wait()
                if not self._running:
                    return
                work, done = self._jobs.pop(0)
            try:
                with torch.inference_mode():
                    result, error = work(), None
            except Exception as e:
                result, error = None, e
            done(result, error)


@dataclass
class Served:
    name: str
    source: str
    kind: str                                  # "lm" | "classifier"
    tokenizer: object
    runner: Engine | Worker                    # runs its requests and jobs
    adapter: int = 0                           # LoRA adapter number on the base's engine (0: none)
    classifier: tuple | None = None            # (model, labels, config) of a classifier run
    created: int = field(default_factory=lambda: int(time.time()))


def default_alias(model: str) -> str:
    if model == "default":
        return "default"
    path = Path(model)
    return path.stem if path.is_file() else path.resolve().name


def lora_of(path: Path) -> tuple[Path, str] | None:
    """(adapter directory, base model) when `path` is a LoRA adapter of a language model, or a
    run that kept one; None otherwise."""
    best = run_model_path(path)
    if best.is_dir() and model_kind(best) == "adapter":
        kind, config_file, raw = adapter_config(best)
        if kind == "lora" and raw.get("task_type") != "SEQ_CLS" and raw.get("base_model_name_or_path"):
            return best, raw["base_model_name_or_path"]
    return None


def load_models(specs: list[tuple[str | None, str]], dtype: str = "bf16", quantize: str = "auto",
                ctx: int | None = None, max_batch: int = 16, max_queue: int = 64, compile: bool = False,
                on_step: Callable | None = None) -> dict[str, Served]:
    """specs: (alias or None, MODEL). Bases of LoRA adapters are loaded once."""
    served: dict[str, Served] = {}
    engines: dict[str, tuple[Engine, object]] = {}   # resolved base path -> (engine, tokenizer)

    def engine_for(model: str):
        key = str(resolve_model_path(model).resolve())   # "default" and its file are one base
        if key not in engines:
            net, tok = load(model, dtype=dtype, quantize=quantize, inference=True)
            if compile:
                from ..model.kernels import require_cpp_compiler
                require_cpp_compiler("--compile")
            engines[key] = (Engine(net, tok, max_batch=max_batch, max_queue=max_queue, ctx=ctx, on_step=on_step,
                                   adapter_rows=AdapterRows()), tok)
        return engines[key]

    for alias, model in specs:
        name = alias or default_alias(model)
        if name in served:
            raise LlamaforgeError(f"two models are called {name!r}: name them with --name ALIAS=MODEL")
        path = resolve_model_path(model)
        labels = classifier_labels(path) if path.is_dir() else None
        if labels is not None:
            from ..train.classify import load_run
            clf, tok, labels, cfg = load_run(path, dtype)
            served[name] = Served(name, str(path), "classifier", tok, Worker(), classifier=(clf, labels, cfg))
            continue
        lora = lora_of(path) if path.is_dir() else None
        if lora is not None:
            adapter_dir, base = lora
            engine, tok = engine_for(base)
            index = 1 + max((s.adapter for s in served.values() if s.runner is engine), default=0)
            add_served_adapter(engine.model, adapter_dir, index, engine.adapter_rows)
            served[name] = Served(name, str(path), "lm", tok, engine, adapter=index)
            continue
        engine, tok = engine_for(model)
        served[name] = Served(name, str(path), "lm", tok, engine)
    return served
