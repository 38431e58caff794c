"""Interactive chat: keeps the conversation, applies the model's chat template, streams replies."""
from __future__ import annotations

import sys
from dataclasses import replace

from ..errors import LlamaforgeError
from ..formats.load import load
from ..model.generation import SamplingConfig, stream

HELP = "commands: /reset clears the conversation, /exit quits (or Ctrl-D)"


def chat_loop(model_path: str, cfg: SamplingConfig, dtype: str = "bf16", system: str | None = None,
              stdin=None, stdout=None, quantize: str | None = None, compile: bool = False, device: str = "auto"):
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    model, tok = load(model_path, dtype=dtype, quantize=quantize, inference=True, device=device)
    interactive = stdin.isatty()
    print(f"chatting with {model_path}; {HELP}", file=sys.stderr)
    history = [{"role": "system", "content": system}] if system else []
    while True:
        if interactive:
            print(">>> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            history = history[:1] if system else []
            continue
        history.append({"role": "user", "content": text})
        ids = tok.encode(tok.apply_chat_template(history), add_special_tokens=False)
        # A reply may use whatever context the history leaves (a small model's context is short).
        turn = replace(cfg, max_new_tokens=max(1, min(cfg.max_new_tokens, model.config.max_seq_len - len(ids))))
        reply = []
        try:
            # reuse_cache: each turn prefills only what the previous turn did not.
            for piece in stream(model, tok, ids, turn, compile=compile, reuse_cache=True):
                reply.append(piece)
                stdout.write(piece)
                stdout.flush()
        except LlamaforgeError as e:   # e.g. the history outgrew the context: keep the session
            history.pop()
            print(f"llamaforge: {e}; /reset starts a new conversation", file=sys.stderr)
            continue
        stdout.write("\n")
        stdout.flush()
        history.append({"role": "assistant", "content": "".join(reply)})
