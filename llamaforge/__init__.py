"""llamaforge: load, fine-tune, evaluate and run Llama-family models, openly.

    import llamaforge
    model, tokenizer = llamaforge.load("default")
    print(llamaforge.generate(model, tokenizer, "The capital of France is", temperature=0))
"""
from .config import LlamaConfig
from .errors import LlamaforgeError
from .formats import Checkpoint, load_checkpoint
from .generate import SamplingConfig, generate, generate_tokens
from .loader import build_model, load
from .model import Llama
from .tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = ["LlamaConfig", "LlamaforgeError", "Checkpoint", "load_checkpoint", "SamplingConfig", "generate", "generate_tokens",
           "build_model", "load", "Llama", "Tokenizer", "__version__"]
