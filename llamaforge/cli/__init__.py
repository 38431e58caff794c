"""The `llamaforge` command. Thin: parse flags, call one public function, print the result.

stdout carries results only (generated text, JSON, reports); everything else goes to stderr.
Every user-facing error is a LlamaforgeError, printed as one line (a traceback with --debug).
"""
from __future__ import annotations

import argparse
import json
import sys

from ..errors import LlamaforgeError
from ..evaluate.tasks import GENERATION_TASKS, TASKS


def _add_sampling_flags(p: argparse.ArgumentParser):
    p.add_argument("--model", default="default", help="default | FILE.gguf | HF dir | Meta dir")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="compute dtype (default: bf16, see README: Speed)")
    p.add_argument("--quantize", choices=["auto", "none", "int8", "int4"], default="auto",
                   help="weight-only int8 / int4 (groups of 32) linear layers: faster decoding, computes in "
                        "bf16. auto (default): int4 for a Q4_1 GGUF in bf16, whose precision it keeps")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step: faster per token after a ~40 s first call")
    _add_device_flag(p)


def _add_device_flag(p: argparse.ArgumentParser):
    p.add_argument("--device", default="auto", metavar="auto|cpu|cuda|cuda:N",
                   help="where the model runs (auto: the first CUDA device when there is one, else the CPU)")


def _sampling_config(args):
    from ..model.generation import SamplingConfig
    return SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          stop=args.stop, ignore_eos=args.ignore_eos, seed=args.seed)


def build_parser(training_flags: bool = True) -> argparse.ArgumentParser:
    """training_flags=False leaves out the flags of `finetune` and `pretrain`, which come from
    their config dataclasses and so import torch: other commands start faster without them."""
    parser = argparse.ArgumentParser(prog="llamaforge", description="Load, run and export Llama-family models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="complete a prompt; prints only the generated text")
    _add_sampling_flags(p)
    p.add_argument("--chat", action="store_true", help="wrap PROMPT as a user message in the chat template")
    p.add_argument("--no-stream", action="store_true", help="print the text at the end instead of as it comes")
    _add_kv_cache_flag(p)
    p.add_argument("prompt", metavar="PROMPT")

    p = sub.add_parser("chat", help="interactive chat with the model's chat template")
    _add_sampling_flags(p)
    p.add_argument("--system", default=None, help="system message")

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP API (and a playground page) for one or more models")
    p.add_argument("models", nargs="*", metavar="MODEL", help="default | FILE.gguf | HF dir | Meta dir | adapter | "
                   "run dir (a classifier run answers /v1/classify); LoRA adapters of one base share its weights")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or $LLAMAFORGE_API_KEY)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (slots in the KV cache)")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot; more get 429")
    p.add_argument("--ctx", type=int, default=None, help="context length of each slot (default: the model's, at most 4096)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--quantize", choices=["auto", "none", "int8", "int4"], default="auto")
    p.add_argument("--compile", action="store_true", help="a single sequence's decode step through torch.compile "
                   "(compiled in about 40 s after start-up, before the first request; then ~1.4x faster; needs g++)")
    p.add_argument("--name", action="append", default=[], metavar="ALIAS=MODEL", help="serve MODEL as ALIAS (repeatable)")
    _add_kv_cache_flag(p)
    _add_device_flag(p)

    p = sub.add_parser("info", help="architecture, size, quantisation, tokenizer, licence")
    p.add_argument("model", nargs="?", default="default", metavar="MODEL")
    p.add_argument("--format", choices=["text", "json"], default="text")

    p = sub.add_parser("openness", help="how open a model is: licence terms, what is published, verdict")
    p.add_argument("model", nargs="?", default="default", metavar="MODEL")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.add_argument("--lang", choices=["en", "zh"], default="en")

    p = sub.add_parser("export", help="write a model in another format")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--to", choices=["hf", "gguf"], required=True)
    p.add_argument("out", metavar="OUT")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="HF export weight dtype")
    p.add_argument("--quant", default="F32", help="GGUF export tensor type: F32, F16, BF16, Q8_0, Q4_0, ...")
    p.add_argument("--license", default=None, help="licence tag of the output (default: the source's); warned "
                                                     "about when the source's terms contradict it")

    p = sub.add_parser("reproduce", help="rerun a training run from its model card and compare the metrics")
    p.add_argument("run", metavar="RUN_DIR")
    p.add_argument("--out", default=None, help="run directory of the rerun (default: RUN_DIR-reproduced)")

    p = sub.add_parser("finetune", help="fine-tune a model")
    recipes = p.add_subparsers(dest="recipe", required=True)   # not "task": sft has a --task flag
    p = recipes.add_parser("classify", help="text classification (full or LoRA); reports on dev and test")
    if training_flags:
        _add_finetune_flags(p, "classify")
    p = recipes.add_parser("sft", help="instruction / chat fine-tuning (full, LoRA or prefix-tuning)")
    if training_flags:
        _add_finetune_flags(p, "sft")
    p = recipes.add_parser("dpo", help="preference tuning on chosen / rejected answers (DPO, IPO, SimPO)")
    if training_flags:
        _add_finetune_flags(p, "dpo")

    p = sub.add_parser("pretrain", help="train a Llama from scratch (or continue one) on plain text")
    p.add_argument("--config", default=None, metavar="YAML", help="settings file; flags given override it")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    if training_flags:
        from ..train.recipes import recipe
        from ..train.runconfig import add_config_flags
        add_config_flags(p, recipe("pretrain")[0], help={
            "data": "a text file or a directory of *.txt files", "out": "run directory",
            "model": "continue pretraining this model instead of starting from random weights",
            "model_config": "from scratch: a preset (tiny, mini, ...); --dim, --n-layers ... change it",
            "tokenizer": "from scratch: an HF tokenizer directory (default: train one with --vocab tokens)",
            "max_steps": "optimiser steps", "max_minutes": "training time budget", "eval_every": "evaluate every N steps",
            "compile": COMPILE_HELP})

    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tok_sub = p.add_subparsers(dest="action", required=True)
    p = tok_sub.add_parser("train", help="train a byte-level BPE tokenizer, saved in the HF format")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--vocab", type=int, required=True, help="vocabulary size")
    p.add_argument("--out", required=True, help="output directory")

    p = sub.add_parser("evaluate", help="score a classifier run, or a model on a task (--task)")
    p.add_argument("run", metavar="MODEL_OR_RUN")
    p.add_argument("--data", required=True, help="the data file (see --task)")
    p.add_argument("--task", choices=TASKS, default=None,
                   help="perplexity: plain text; sft: chat/alpaca/completion file (answer tokens); "
                        + "; ".join(f"{name}: {t.data}" for name, t in GENERATION_TASKS.items())
                        + ". Without --task: a classification run on labelled data")
    p.add_argument("--text-column", default=None)
    p.add_argument("--text-pair-column", default=None)
    p.add_argument("--label-column", default=None)
    p.add_argument("--target", default=None, help="translate: line-aligned reference file")
    p.add_argument("--target-lang", default=None, help="translate: language to translate into (default: what "
                   "the data names: a TSV's header row such as en<TAB>de, or the target file's suffix)")
    p.add_argument("--source-lang", default=None, help="translate: language translated from (default: the data's)")
    p.add_argument("--window", type=int, default=None, help="perplexity: window in tokens (stride: half)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="qa / translate / summarize answer length")
    p.add_argument("--limit", type=int, default=None, help="score only the first N items")
    p.add_argument("--predictions", default=None, metavar="FILE.jsonl", help="write generated answers here")
    p.add_argument("--batch-size", type=int, default=None, help="default 64 (classify), 8 (tasks)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: the run's, or bf16")
    p.add_argument("--format", choices=["text", "json"], default="text")
    _add_device_flag(p)

    p = sub.add_parser("predict", help="labels and class probabilities from a fine-tuned classifier")
    p.add_argument("run", metavar="RUN_DIR")
    p.add_argument("text", nargs="*", metavar="TEXT")
    p.add_argument("--data", default=None, help="CSV, TSV, JSONL or JSON file of texts")
    p.add_argument("--text-column", default=None)
    p.add_argument("--out", default=None, help=".csv, .tsv or .jsonl file (default: JSON lines on stdout)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: the run's")
    _add_device_flag(p)
    return parser


COMPILE_HELP = ("torch.compile the blocks' training steps: ~70 s the first time, ~10 s once cached (counted in "
                "--max-minutes), then faster steps. Default: on for CPU LoRA runs of 500 steps or more, 100 once this "
                "machine has compiled the same blocks (false: never)")
FINETUNE_HELP = {
    "train": "training data: CSV, TSV, JSONL or JSON", "dev": "dev data (evaluated each epoch)",
    "test": "test data (reported at the end)", "out": "run directory",
    "model": "base model: default | FILE.gguf | HF dir | Meta dir | run dir",
    "lr": "peak learning rate (default: per method, see README)",
    "max_steps": "optimiser steps (overrides --epochs)", "max_minutes": "training time budget",
    "eval_every": "evaluate every N steps (default: each epoch)", "patience": "early stop after N evaluations without improvement",
    "class_weights": "balanced: weight the loss by inverse class frequency",
    "truncation_side": "which end of a text longer than --max-length is dropped: right (its end) or left (its "
                       "beginning, so that the pooled last token is the text's own last token)",
    "lora_targets": "comma-separated: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    "warmup": "fraction of steps (< 1) or steps (>= 1)", "schedule": "linear | cosine | constant",
    "method": "classify: lora (default) | full; sft: lora (default) | full | prefix",
    "format": "auto | chat (messages) | alpaca (instruction/input/output) | completion (prompt/completion)",
    "task": f"{' | '.join(GENERATION_TASKS)}: train on a task file, with the prompts `evaluate --task` uses",
    "loss": "dpo: sigmoid (DPO) | ipo | simpo", "beta": "dpo: the strength of the reference model's pull (TRL's beta)",
    "sft_weight": "dpo: add this times the chosen answer's next-token loss", "simpo_gamma": "simpo: the target margin",
    "pack": "pack short examples into rows of --max-length tokens (no attention across examples)",
    "compile": COMPILE_HELP,
    "batch_size": "examples per optimiser step, over all processes (each takes its share)",
    "grad_accum": "micro-steps each process cuts its share of a batch into (less memory, same optimisation)",
    "device": "auto | cpu | cuda | cuda:N (auto: CUDA when available; under torchrun each process its own GPU)",
    "distributed": "under torchrun: ddp | fsdp | auto (DDP for lora and prefix, FSDP2 for full and pretrain)",
    "nproc": "start torchrun with N processes on this machine (or run under torchrun yourself)",
    "gradient_checkpointing": "recompute each block's activations in the backward pass: less memory, ~30%% more time",
    "quantize_base": "int8 | int4: LoRA over a base held quantised (QLoRA): the frozen weights take 1/2 or ~1/3 "
                     "of bf16's memory",
}


def _add_kv_cache_flag(p: argparse.ArgumentParser):
    p.add_argument("--kv-cache", choices=["bf16", "int8"], default="bf16",
                   help="keys and values as the model's dtype, or int8 with a scale per position and head (half "
                        "the bytes a decode step reads, faster on AMX tiles; a small cost in quality)")


def _add_finetune_flags(p: argparse.ArgumentParser, task: str):
    from ..train.runconfig import add_config_flags
    p.add_argument("--config", default=None, metavar="YAML", help="settings file; flags given override it")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    from ..train.recipes import recipe
    add_config_flags(p, recipe(task)[0], help=FINETUNE_HELP)


def cmd_generate(args):
    from ..formats.load import load
    from ..model.generation import encode_prompt, stream

    cfg = _sampling_config(args)   # bad sampling options fail before the model is loaded
    model, tok = load(args.model, dtype=args.dtype or "bf16", quantize=args.quantize, inference=True, device=args.device)
    if args.kv_cache == "int8":
        from ..model.kernels import use_int8_kv_cache
        use_int8_kv_cache(model)
    ids = encode_prompt(tok, args.prompt, chat=args.chat)
    pieces = stream(model, tok, ids, cfg, compile=args.compile)
    if args.no_stream:
        sys.stdout.write("".join(pieces) + "\n")
        return
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_chat(args):
    from .chat import chat_loop
    chat_loop(args.model, _sampling_config(args), dtype=args.dtype or "bf16", system=args.system,
              quantize=args.quantize, compile=args.compile, device=args.device)


def cmd_info(args):
    from ..formats.info import format_info, model_info
    info = model_info(args.model)
    print(json.dumps(info, indent=2, ensure_ascii=False) if args.format == "json" else format_info(info))


def cmd_openness(args):
    from ..provenance.openness import format_report, report, sentence
    r = report(args.model, lang=args.lang)
    if args.format == "json":
        print(json.dumps({**r, "summary": sentence(r, args.lang)}, indent=2, ensure_ascii=False))
    else:
        print(format_report(r, args.lang))


def cmd_export(args):
    from ..export import export
    out = export(args.model, args.to, args.out, dtype=args.dtype, quant=args.quant, license=args.license)
    print(out)


def cmd_reproduce(args):
    from ..train.reproduce import reproduce
    result = reproduce(args.run, args.out)
    print(json.dumps(result, indent=2, ensure_ascii=False))
    if not result["match"]:
        raise LlamaforgeError(f"{args.run}: the rerun's metrics differ from the card's (see above)")


def _run_recipe(name: str, args):
    """Resolve the recipe's config (defaults < --config YAML < flags; a resumed run's own) and run it."""
    from ..train.recipes import recipe
    from ..train.runconfig import resolve_config
    cls, run = recipe(name)
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "recipe", "config", "resume", "debug")}
    if args.resume:   # the run's own settings; only how long it goes on may change
        from ..train.base import resume_config
        from ..train.runconfig import read_config_values
        given = (read_config_values(cls, args.config) if args.config else {}) | {
            k: v for k, v in overrides.items() if v is not None}
        cfg = resume_config(cls, args.out, given)
    else:
        cfg = resolve_config(cls, args.config, overrides)
    from ..train.distributed import relaunch_under_torchrun, under_torchrun
    if cfg.nproc > 1 and not under_torchrun():
        relaunch_under_torchrun(cfg.nproc, _ARGV)   # does not return
    if under_torchrun() and not args.resume:   # the run records how many processes it had
        import os
        cfg.nproc = int(os.environ["WORLD_SIZE"])
    return run(cfg, resume=args.resume)


def cmd_finetune(args):
    final = _run_recipe(args.recipe, args)
    if final is None:   # a rank of a distributed run other than 0: rank 0 prints
        return
    if args.recipe == "classify":
        from ..evaluate.metrics import format_report
        print("\n\n".join(format_report(r, title=f"{name} (best model)") for name, r in final.items()))
    else:
        print(json.dumps(final["dev"]))


def cmd_evaluate(args):
    if args.task:
        from ..evaluate.scoring import evaluate_model, format_scores
        scores = evaluate_model(args.run, args.task, args.data, target=args.target, target_lang=args.target_lang,
                                source_lang=args.source_lang, dtype=args.dtype or "bf16", batch_size=args.batch_size or 8,
                                window=args.window, max_new_tokens=args.max_new_tokens, limit=args.limit,
                                predictions_out=args.predictions, device=args.device)
        print(json.dumps(scores, ensure_ascii=False) if args.format == "json" else format_scores(scores))
        return
    from ..evaluate.metrics import format_report
    from ..train.classify import evaluate_classifier
    report = evaluate_classifier(args.run, args.data, text_column=args.text_column, label_column=args.label_column,
                                 text_pair_column=args.text_pair_column, batch_size=args.batch_size or 64,
                                 dtype=args.dtype, device=args.device)
    print(json.dumps(report, indent=2, ensure_ascii=False) if args.format == "json" else format_report(report))


def cmd_pretrain(args):
    final = _run_recipe("pretrain", args)
    if final is not None:   # (None: a rank of a distributed run other than 0)
        print(json.dumps(final))


def cmd_tokenizer(args):
    from ..data.corpus import corpus_files, documents
    from ..text.training import save_trained_tokenizer, train_tokenizer
    files = [f for name in args.files for f in corpus_files(name)]
    tok = train_tokenizer(documents(files), args.vocab)
    save_trained_tokenizer(tok, args.out)
    print(args.out)


def cmd_predict(args):
    from ..train.classify import predict_classifier
    if bool(args.text) == bool(args.data):
        raise LlamaforgeError("give either TEXT arguments or --data FILE")
    rows = predict_classifier(args.run, texts=args.text or None, data=args.data, out=args.out,
                              text_column=args.text_column, batch_size=args.batch_size, dtype=args.dtype,
                              device=args.device)
    if args.out:
        print(f"llamaforge: wrote {len(rows)} predictions to {args.out}", file=sys.stderr)
    else:
        for r in rows:
            print(json.dumps(r, ensure_ascii=False))


def cmd_serve(args):
    from ..serve.server import serve
    serve(args.models, host=args.host, port=args.port, api_key=args.api_key, max_batch=args.max_batch,
          max_queue=args.max_queue, ctx=args.ctx, dtype=args.dtype, quantize=args.quantize, compile=args.compile,
          names=args.name, device=args.device, kv_cache=args.kv_cache)


_ARGV: list[str] = []   # this command's arguments, for `--nproc` to start it again under torchrun

COMMANDS = {"generate": cmd_generate, "serve": cmd_serve, "chat": cmd_chat, "info": cmd_info, "export": cmd_export, "openness": cmd_openness,
            "reproduce": cmd_reproduce,
            "finetune": cmd_finetune, "evaluate": cmd_evaluate, "predict": cmd_predict, "pretrain": cmd_pretrain,
            "tokenizer": cmd_tokenizer}


def main(argv=None):
    global _ARGV
    from ..files import keep_compiled_code
    keep_compiled_code()
    argv = sys.argv[1:] if argv is None else list(argv)
    _ARGV = argv
    from ..provenance.command import set_command_line
    set_command_line(argv)   # for the model cards of what this command writes
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(training_flags=command in ("finetune", "pretrain")).parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except LlamaforgeError as e:
        if args.debug:
            raise
        print(f"llamaforge: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `llamaforge generate ... | head` closed the pipe: not an error
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush cannot fail
        sys.exit(0)


if __name__ == "__main__":
    main()
