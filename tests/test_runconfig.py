"""train/runconfig.py: YAML files and flags onto config dataclasses, every value as its field's type."""
import pytest

from llamaforge.errors import LlamaforgeError
from llamaforge.train.classify import ClassifyConfig
from llamaforge.train.runconfig import resolve_config


def test_yaml_values_take_their_fields_types(tmp_path):
    # YAML 1.1 (PyYAML) reads 2e-5 as the string '2e-5', and 3.0 as a float.
    (tmp_path / "c.yaml").write_text("lr: 2e-5\nepochs: 3.0\nlora_targets: q_proj, v_proj\ncompile: 'yes'\n"
                                     "label_column: 0\nwarmup: 10\n")
    cfg = resolve_config(ClassifyConfig, tmp_path / "c.yaml", {"batch_size": 8})
    assert cfg.lr == 2e-5 and isinstance(cfg.lr, float)
    assert cfg.epochs == 3 and isinstance(cfg.epochs, int)
    assert cfg.lora_targets == ["q_proj", "v_proj"] and cfg.compile is True
    assert cfg.label_column == "0" and cfg.warmup == 10.0 and cfg.batch_size == 8


@pytest.mark.parametrize("line, message", [
    ("lr: fast", r"c\.yaml: lr: expected float, found 'fast'"),
    ("epochs: 2.5", r"c\.yaml: epochs: expected int, found 2\.5"),
    ("batch_size: true", r"c\.yaml: batch_size: expected int, found True"),
    ("lora_targets: {q: 1}", r"c\.yaml: lora_targets: expected a list of str"),
    ("learning_rate: 1e-4", r"c\.yaml: unknown setting 'learning_rate'"),
])
def test_a_bad_value_names_its_key_and_file(tmp_path, line, message):
    (tmp_path / "c.yaml").write_text(line + "\n")
    with pytest.raises(LlamaforgeError, match=message):
        resolve_config(ClassifyConfig, tmp_path / "c.yaml")
