"""Serving: `llamaforge serve`, an OpenAI-compatible HTTP API over the scheduler of `engine.py`
(continuous batching, a slot per sequence, prefix reuse, several LoRA adapters on one base), with
its playground page."""
