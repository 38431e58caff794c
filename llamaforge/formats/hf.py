"""Hugging Face model directories in and out: config.json, safetensors (single or sharded),
pytorch_model.bin (through `torch.load(weights_only=True)` only), tokenizer files."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import LlamaforgeError
from ..files import atomic_output_dir, read_front_matter, read_json, write_json
from ..model.config import LlamaConfig
from ..text.convert import from_hf_dir
from .checkpoint import Checkpoint, stored_dtypes

# HF's names of each family (model_type -> class prefix): Llama's architecture, with Qwen2's
# q/k/v biases and Mistral's sliding window as config fields.
FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}
SUPPORTED_ARCHITECTURES = {prefix + kind for prefix in FAMILIES.values()
                           for kind in ("ForCausalLM", "ForSequenceClassification", "Model")}


def architecture(c: LlamaConfig, kind: str = "ForCausalLM") -> str:
    """HF's class name of a model of this config, e.g. "Qwen2ForSequenceClassification"."""
    return FAMILIES[c.arch] + kind


def config_from_hf(cfg: dict, path: Path) -> LlamaConfig:
    archs = cfg.get("architectures") or []
    arch = cfg.get("model_type", "llama")
    if arch not in FAMILIES or (archs and not set(archs) & SUPPORTED_ARCHITECTURES):
        raise LlamaforgeError(f"{path}: unsupported architecture {archs or arch!r} (llamaforge reads "
                              f"{', '.join(p + 'ForCausalLM' for p in FAMILIES.values())} and their classifiers)")
    try:
        n_heads = cfg["num_attention_heads"]
        scaling = cfg.get("rope_scaling") or (cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else None)
        rope_theta = cfg.get("rope_theta") or (scaling or {}).get("rope_theta", 10000.0)
        if scaling and scaling.get("rope_type", scaling.get("type")) not in ("llama3",):
            if scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
                raise LlamaforgeError(f"{path}: unsupported rope_scaling {scaling!r}")
            scaling = None
        if scaling:
            scaling = {k: float(scaling[k]) if k != "original_max_position_embeddings" else int(scaling[k])
                       for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
        context = cfg.get("max_position_embeddings", 2048)
        window = cfg.get("sliding_window") if arch == "mistral" else None
        if arch == "qwen2" and cfg.get("use_sliding_window"):
            raise LlamaforgeError(f"{path / 'config.json'}: Qwen2's per-layer sliding window (use_sliding_window) "
                                  f"is not supported")
        return LlamaConfig(
            sliding_window=window if window and window < context else None,
            arch=arch, qkv_bias=arch == "qwen2",
            vocab_size=cfg["vocab_size"], dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads, n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            intermediate_size=cfg["intermediate_size"],
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
            norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(rope_theta), rope_scaling=scaling,
            max_seq_len=context,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)), mlp_bias=bool(cfg.get("mlp_bias", False)))
    except KeyError as e:
        raise LlamaforgeError(f"{path / 'config.json'}: missing field {e.args[0]}") from None
    except (ValueError, TypeError, ZeroDivisionError) as e:
        raise LlamaforgeError(f"{path / 'config.json'}: {e}") from None


def config_to_hf(c: LlamaConfig, tokenizer=None) -> dict:
    cfg = {
        "architectures": [architecture(c)], "model_type": c.arch,
        "vocab_size": c.vocab_size, "hidden_size": c.dim, "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
        "intermediate_size": c.intermediate_size, "head_dim": c.head_dim, "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta, "max_position_embeddings": c.max_seq_len,
        "tie_word_embeddings": c.tie_embeddings, "attention_bias": c.attention_bias, "mlp_bias": c.mlp_bias,
        "hidden_act": "silu", "torch_dtype": "float32",
        "rope_scaling": dict(c.rope_scaling, rope_type="llama3") if c.rope_scaling else None,
    }
    if c.arch == "qwen2":   # its q/k/v biases are implied; it has no attention_bias field
        cfg.update(use_sliding_window=False, sliding_window=None)
        del cfg["attention_bias"], cfg["mlp_bias"]
    elif c.arch == "mistral":
        cfg["sliding_window"] = c.sliding_window
    if tokenizer is not None:
        cfg["bos_token_id"], cfg["eos_token_id"] = tokenizer.bos_id, tokenizer.eos_id
        cfg["pad_token_id"] = tokenizer.token_id(tokenizer.pad_token)
    return cfg


def _from_hf_name(name: str) -> str:
    return name[len("model."):] if name.startswith("model.") else name


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                       "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _read_safetensors(files: list[Path], weights: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of safetensors files; weights=False: from their headers, as meta tensors."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    state = {}
    for f in files:
        try:
            if weights:
                state.update(load_file(str(f)))
                continue
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    piece = st.get_slice(name)
                    state[name] = torch.empty(piece.get_shape(), dtype=_SAFETENSORS_DTYPES.get(piece.get_dtype(),
                                              torch.float32), device="meta")
        except (SafetensorError, OSError, ValueError) as e:
            raise LlamaforgeError(f"{f}: unreadable safetensors file ({str(e).splitlines()[0]})") from None
    return state


def read_weights(path: Path, weights: bool = True) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise LlamaforgeError(f"{index}: not a safetensors index (no weight_map)")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (path / s).exists()]
        if missing:
            raise LlamaforgeError(f"{path / missing[0]}: shard listed in {index.name} is missing")
        return _read_safetensors([path / s for s in shards], weights)
    files = sorted(path.glob("*.safetensors"))
    if files:
        return _read_safetensors(files, weights)
    bins = sorted(path.glob("pytorch_model*.bin"))
    if bins:
        state = {}
        for f in bins:
            try:
                # weights_only: never unpickle arbitrary objects from a file we did not write. mmap:
                # without weights only the shapes are wanted, and nothing is read but the pickle.
                loaded = torch.load(f, map_location="cpu", weights_only=True, mmap=not weights)
                state.update(loaded if weights else {k: torch.empty_like(v, device="meta") for k, v in loaded.items()})
            except Exception as e:
                raise LlamaforgeError(f"{f}: unreadable PyTorch weights ({str(e).splitlines()[0]})") from None
        return state
    raise LlamaforgeError(f"{path}: no *.safetensors or pytorch_model.bin weights")


def load(path: Path, dtype: torch.dtype | None = None, weights: bool = True) -> Checkpoint:
    """weights=False: config, tokenizer and tensor shapes only (meta tensors, for `info`)."""
    raw = read_json(path / "config.json")
    config = config_from_hf(raw, path)
    state = read_weights(path, weights)
    state = {_from_hf_name(k): state.pop(k).to(dtype) if dtype is not None else state.pop(k) for k in list(state)}
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    state.pop("score.weight", None)  # a classification head is not part of the language model
    for k in [k for k in state if k.endswith("rotary_emb.inv_freq")]:
        del state[k]  # transformers < 4.31 saved its RoPE table; we compute it
    metadata = {"name": raw.get("_name_or_path") or path.name, "license": _card_license(path),
                "quantization": stored_dtypes(state)}
    return Checkpoint(config, state, from_hf_dir(path), metadata)


def _card_license(path: Path) -> dict | None:
    """`license:` from the model card's YAML front matter, if any."""
    try:
        lic = read_front_matter(path / "README.md").get("license")
    except LlamaforgeError:   # a malformed card does not stop the model from loading
        return None
    return {"license": str(lic)} if lic else None


def save(ckpt, out_dir, dtype: torch.dtype | None = None, extra=None, writer=None):
    """Write an HF directory that transformers' LlamaForCausalLM loads to the same logits; it
    appears whole or not at all. extra(tmp_dir): writes more files into it (a model card);
    writer(ckpt, dir, dtype): writes the model's files instead of `write` (a classifier)."""
    with atomic_output_dir(out_dir) as tmp:
        (writer or write)(ckpt, tmp, dtype)
        if extra is not None:
            extra(tmp)


def write_model(llama, tokenizer, out_dir: Path):
    """A trained `model.llama.Llama` (unfused, HF parameter names) as an HF directory's files."""
    write(Checkpoint(llama.config, llama.state_dict(), tokenizer), out_dir)


def write_classifier(ckpt, score: torch.Tensor, labels: list[str], out_dir: Path, dtype: torch.dtype | None = None):
    """The files of an HF `LlamaForSequenceClassification` directory (a classifier's Llama, its
    `score` head and labels), into an existing directory; transformers loads it as it is."""
    from safetensors.torch import save_file
    state = {"model." + k: v for k, v in ckpt.state_dict.items() if k != "lm_head.weight"} | {"score.weight": score}
    state = {k: (v.to(dtype) if dtype else v).detach().contiguous() for k, v in state.items()}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    tok = ckpt.tokenizer
    cfg = config_to_hf(ckpt.config, tok)
    cfg.update(architectures=[architecture(ckpt.config, "ForSequenceClassification")], num_labels=len(labels),
               pad_token_id=tok.pad_id,
               id2label={str(i): n for i, n in enumerate(labels)}, label2id={n: i for i, n in enumerate(labels)},
               torch_dtype=str(state["score.weight"].dtype).replace("torch.", ""))
    write_json(out_dir / "config.json", cfg)
    tok.save_hf(out_dir)


def classifier_head(path: Path) -> torch.Tensor:
    """The `score` weight of an HF LlamaForSequenceClassification directory."""
    head = {k: v for k, v in read_weights(path).items() if k == "score.weight"}
    if not head:
        raise LlamaforgeError(f"{path}: no score.weight: not a sequence classification model")
    return head["score.weight"]


def write(ckpt, out_dir: Path, dtype: torch.dtype | None = None):
    """The files of an HF model directory, into an existing directory."""
    from safetensors.torch import save_file

    state = {}
    for k, v in ckpt.state_dict.items():
        t = v.detach().contiguous()
        state[k if k == "lm_head.weight" else "model." + k] = t.to(dtype) if dtype else t
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = config_to_hf(ckpt.config, ckpt.tokenizer)
    cfg["torch_dtype"] = str(next(iter(state.values())).dtype).replace("torch.", "")
    write_json(out_dir / "config.json", cfg)
    gen = {"bos_token_id": ckpt.tokenizer.bos_id, "eos_token_id": sorted(ckpt.tokenizer.stop_ids) or None}
    write_json(out_dir / "generation_config.json", gen)
    ckpt.tokenizer.save_hf(out_dir)
