"""The `llamaforge` command. Thin: parse flags, call one public function, print the result.

stdout carries results only (generated text, JSON, reports); everything else goes to stderr.
Every user-facing error is a LlamaforgeError, printed as one line (a traceback with --debug).
"""
from __future__ import annotations

import argparse
import json
import sys

from .errors import LlamaforgeError


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


def _sampling_config(args):
    from .generate import SamplingConfig
    return SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          stop=args.stop, ignore_eos=args.ignore_eos, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamaforge", description="Load, run and export Llama-family models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="complete a prompt; prints only the generated text")
    _add_sampling_flags(p)
    p.add_argument("--chat", action="store_true", help="wrap PROMPT as a user message in the chat template")
    p.add_argument("--no-stream", action="store_true", help="print the text at the end instead of as it comes")
    p.add_argument("prompt", metavar="PROMPT")

    p = sub.add_parser("chat", help="interactive chat with the model's chat template")
    _add_sampling_flags(p)
    p.add_argument("--system", default=None, help="system message")

    p = sub.add_parser("info", help="architecture, size, quantisation, tokenizer, licence")
    p.add_argument("model", nargs="?", default="default", metavar="MODEL")
    p.add_argument("--format", choices=["text", "json"], default="text")

    p = sub.add_parser("export", help="write a model in another format")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--to", choices=["hf", "gguf"], required=True)
    p.add_argument("out", metavar="OUT")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="HF export weight dtype")
    p.add_argument("--quant", default="F32", help="GGUF export tensor type: F32, F16, BF16, Q8_0, Q4_0, ...")

    p = sub.add_parser("finetune", help="fine-tune a model")
    tasks = p.add_subparsers(dest="task", required=True)
    p = tasks.add_parser("classify", help="text classification (full or LoRA); reports on dev and test")
    _add_classify_flags(p)

    p = sub.add_parser("evaluate", help="score a fine-tuned classifier on labelled data")
    p.add_argument("run", metavar="RUN_DIR")
    p.add_argument("--data", required=True, help="CSV, TSV, JSONL or JSON file")
    p.add_argument("--text-column", default=None)
    p.add_argument("--text-pair-column", default=None)
    p.add_argument("--label-column", default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: the run's")
    p.add_argument("--format", choices=["text", "json"], default="text")

    p = sub.add_parser("predict", help="labels and class probabilities from a fine-tuned classifier")
    p.add_argument("run", metavar="RUN_DIR")
    p.add_argument("text", nargs="*", metavar="TEXT")
    p.add_argument("--data", default=None, help="CSV, TSV, JSONL or JSON file of texts")
    p.add_argument("--text-column", default=None)
    p.add_argument("--out", default=None, help=".csv, .tsv or .jsonl file (default: JSON lines on stdout)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: the run's")
    return parser


def _add_classify_flags(p: argparse.ArgumentParser):
    from .runconfig import add_config_flags
    from .tasks.classify import ClassifyConfig
    p.add_argument("--config", default=None, metavar="YAML", help="settings file; flags given override it")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_config_flags(p, ClassifyConfig, help={
        "train": "training data: CSV, TSV, JSONL or JSON", "dev": "dev data (evaluated each epoch)",
        "test": "test data (reported at the end)", "out": "run directory",
        "model": "base model: default | FILE.gguf | HF dir | Meta dir",
        "method": "lora (default) or full", "lr": "peak learning rate (default 5e-4 LoRA, 2e-5 full)",
        "max_steps": "optimiser steps (overrides --epochs)", "max_minutes": "training time budget",
        "eval_every": "evaluate every N steps (default: each epoch)", "patience": "early stop after N evaluations without improvement",
        "class_weights": "balanced: weight the loss by inverse class frequency",
        "lora_targets": "comma-separated: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        "warmup": "fraction of steps (< 1) or steps (>= 1)", "schedule": "linear | cosine | constant",
    })


def cmd_generate(args):
    from .generate import encode_prompt, stream
    from .loader import load

    cfg = _sampling_config(args)   # bad sampling options fail before the model is loaded
    model, tok = load(args.model, dtype=args.dtype or "bf16", quantize=args.quantize, inference=True)
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
              quantize=args.quantize, compile=args.compile)


def cmd_info(args):
    from .info import model_info, format_info
    info = model_info(args.model)
    print(json.dumps(info, indent=2, ensure_ascii=False) if args.format == "json" else format_info(info))


def cmd_export(args):
    from .export import export
    out = export(args.model, args.to, args.out, dtype=args.dtype, quant=args.quant)
    print(out)


def cmd_finetune(args):
    from .runconfig import resolve_config
    from .metrics import format_report
    from .tasks.classify import ClassifyConfig, finetune_classify
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "task", "config", "resume", "debug")}
    if args.resume:
        cfg = ClassifyConfig(out=args.out)
    else:
        cfg = resolve_config(ClassifyConfig, args.config, overrides)
    final = finetune_classify(cfg, resume=args.resume)
    print("\n\n".join(format_report(r, title=f"{name} (best model)") for name, r in final.items()))


def cmd_evaluate(args):
    from .metrics import format_report
    from .tasks.classify import evaluate_classifier
    report = evaluate_classifier(args.run, args.data, text_column=args.text_column, label_column=args.label_column,
                                 text_pair_column=args.text_pair_column, batch_size=args.batch_size, dtype=args.dtype)
    print(json.dumps(report, indent=2, ensure_ascii=False) if args.format == "json" else format_report(report))


def cmd_predict(args):
    from .tasks.classify import predict_classifier
    if bool(args.text) == bool(args.data):
        raise LlamaforgeError("give either TEXT arguments or --data FILE")
    rows = predict_classifier(args.run, texts=args.text or None, data=args.data, out=args.out,
                              text_column=args.text_column, batch_size=args.batch_size, dtype=args.dtype)
    if args.out:
        print(f"llamaforge: wrote {len(rows)} predictions to {args.out}", file=sys.stderr)
    else:
        for r in rows:
            print(json.dumps(r, ensure_ascii=False))


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "info": cmd_info, "export": cmd_export,
            "finetune": cmd_finetune, "evaluate": cmd_evaluate, "predict": cmd_predict}


def main(argv=None):
    args = build_parser().parse_args(argv)
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
