"""Checkpoint formats and loading. Each format module (gguf, hf, meta) reads into, and writes
from, one `Checkpoint`; `paths` decides what a path holds; `load` turns any of them into a model
and its tokenizer; `info` describes one."""
