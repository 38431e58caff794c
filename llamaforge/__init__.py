"""llamaforge: load, fine-tune, evaluate and run Llama-family models, openly.

    import llamaforge
    model, tokenizer = llamaforge.load("default")
    print(llamaforge.generate(model, tokenizer, "The capital of France is", temperature=0))

The names below are imported on first use, so that commands which only read metadata
(`llamaforge openness`) start without importing torch.
"""
import importlib

__version__ = "0.1.0"
_EXPORTS = {
    "LlamaConfig": ".model.config", "LlamaforgeError": ".errors", "Checkpoint": ".formats.checkpoint",
    "load_checkpoint": ".formats.load", "SamplingConfig": ".model.generation", "generate": ".model.generation",
    "generate_tokens": ".model.generation", "build_model": ".formats.load", "load": ".formats.load",
    "Llama": ".model.llama", "Tokenizer": ".text.tokenizer",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'llamaforge' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value
