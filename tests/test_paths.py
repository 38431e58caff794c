"""formats/paths.py: the one place that decides what a model path holds."""
import json

import pytest

from llamaforge.errors import LlamaforgeError
from llamaforge.formats.paths import adapter_config, model_kind, run_model_path


def test_each_kind_of_model_path(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + bytes(20))
    assert model_kind(tmp_path / "m.gguf") == "gguf"
    for name, files, kind in [("hf", ["config.json"], "hf"), ("meta", ["params.json"], "meta"),
                              ("lora", ["adapter_config.json", "README.md"], "adapter"),
                              ("prefix", ["prefix_config.json"], "adapter"),
                              ("run", ["config.yaml", "label_map.json"], "run"),
                              ("full_best", ["config.yaml", "config.json"], "hf")]:   # an HF dir with a YAML beside
        d = tmp_path / name
        d.mkdir()
        for f in files:
            (d / f).write_text("{}")
        assert model_kind(d) == kind, name


def test_what_is_no_model_is_said_in_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(LlamaforgeError, match=r"notes\.txt: not a GGUF file"):
        model_kind(tmp_path / "notes.txt")
    with pytest.raises(LlamaforgeError, match="not a model directory"):
        model_kind(tmp_path)


def test_a_run_stands_for_its_best_model_and_an_adapter_for_its_config(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: default\n")
    with pytest.raises(LlamaforgeError, match="best/ is missing"):
        run_model_path(run)
    (run / "best").mkdir()
    (run / "best" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "default"}))
    assert run_model_path(run) == run / "best"
    assert adapter_config(run / "best")[0] == "lora"
    assert adapter_config(run / "best")[2]["base_model_name_or_path"] == "default"
    (run / "best" / "adapter_config.json").write_text("{")
    with pytest.raises(LlamaforgeError, match=r"adapter_config\.json: not valid JSON"):
        adapter_config(run / "best")


def test_headers_only_give_every_shape_and_read_no_weights(default_checkpoint, tiny_model_dir, tmp_path):
    """weights=False (what `info` reads): the same tensors, shapes and config as a full load, as
    meta tensors, for GGUF and HF directories (a .bin one too)."""
    import torch

    from llamaforge.formats.info import model_info
    from llamaforge.formats.load import load_checkpoint
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.suffix != ".safetensors":
            (bin_dir / f.name).write_bytes(f.read_bytes())
    full_hf = load_checkpoint(tiny_model_dir)
    torch.save({("model." + k if k != "lm_head.weight" else k): v for k, v in full_hf.state_dict.items()},
               bin_dir / "pytorch_model.bin")
    for source, full in (("default", default_checkpoint), (tiny_model_dir, full_hf), (bin_dir, full_hf)):
        head = load_checkpoint(source, weights=False)
        assert head.config == full.config and all(t.is_meta for t in head.state_dict.values())
        assert {k: tuple(v.shape) for k, v in head.state_dict.items()} == {k: tuple(v.shape) for k, v in full.state_dict.items()}
    assert model_info()["parameters"] == sum(t.numel() for t in default_checkpoint.state_dict.values())
