"""The models a server serves, by alias: each MODEL given to `llamaforge serve` becomes a language
model with an engine of its own, a LoRA adapter on the engine of its base (several adapters of one
base share its weights), or a classifier. One Scheduler thread loads and runs them all."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import LlamaforgeError
from ..formats.load import load
from ..formats.paths import adapter_config, classifier_labels, model_kind, resolve_model_path, run_model_path
from ..model.adapters import AdapterRows, add_served_adapter
from .engine import Engine, Scheduler


@dataclass
class Served:
    name: str
    source: str
    kind: str                                  # "lm" | "classifier"
    tokenizer: object
    runner: Engine | Scheduler                 # runs its requests and jobs (a classifier: the scheduler)
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
                on_step: Callable | None = None, device: str = "auto", kv_cache: str = "bf16"
                ) -> tuple[dict[str, Served], Scheduler]:
    """specs: (alias or None, MODEL). Bases of LoRA adapters are loaded once. Loading runs on the
    scheduler's thread too: no other thread ever runs a torch operation (see Scheduler)."""
    from ..model.device import resolve_device
    device = str(resolve_device(device))   # a CUDA device that is not there fails before anything loads
    served: dict[str, Served] = {}
    engines: dict[str, tuple[Engine, object]] = {}   # resolved base path -> (engine, tokenizer)
    scheduler = Scheduler(on_step)
    if compile:
        from ..model.kernels import prepare_compile
        prepare_compile("--compile")

    def engine_for(model: str):
        key = str(resolve_model_path(model).resolve())   # "default" and its file are one base
        if key not in engines:
            def loaded():
                net, tok = load(model, dtype=dtype, quantize=quantize, inference=True, batched=True, device=device)
                if kv_cache == "int8":
                    from ..model.kernels import use_int8_kv_cache
                    use_int8_kv_cache(net)
                return net, tok
            net, tok = scheduler.call(loaded)
            engines[key] = (Engine(net, tok, max_batch=max_batch, max_queue=max_queue, ctx=ctx,
                                   adapter_rows=AdapterRows(), scheduler=scheduler, compile=compile), tok)
        return engines[key]

    try:
        for alias, model in specs:
            name = alias or default_alias(model)
            if name in served:
                raise LlamaforgeError(f"two models are called {name!r}: name them with --name ALIAS=MODEL")
            path = resolve_model_path(model)
            labels = classifier_labels(path) if path.is_dir() else None
            if labels is not None:
                from ..train.classify import load_run
                clf, tok, labels, cfg = scheduler.call(lambda path=path: load_run(path, dtype, device))
                served[name] = Served(name, str(path), "classifier", tok, scheduler, classifier=(clf, labels, cfg))
                continue
            lora = lora_of(path) if path.is_dir() else None
            if lora is not None:
                adapter_dir, base = lora
                engine, tok = engine_for(base)
                index = 1 + max((s.adapter for s in served.values() if s.runner is engine), default=0)
                scheduler.call(lambda e=engine, d=adapter_dir, i=index: add_served_adapter(e.model, d, i, e.adapter_rows))
                served[name] = Served(name, str(path), "lm", tok, engine, adapter=index)
                continue
            engine, tok = engine_for(model)
            served[name] = Served(name, str(path), "lm", tok, engine)
    except BaseException:
        scheduler.shutdown("loading failed")
        raise
    # The CPU kernels load (about a second), and --compile compiles (about 40 s), after the server
    # is up and before its first request is served.
    for engine, _ in engines.values():
        scheduler.run_job(engine.warm_up, lambda result, error: None)
    return served, scheduler
