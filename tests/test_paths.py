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
