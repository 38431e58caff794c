"""files.py: every read names the file (and line), every write is whole or absent."""
import pytest

from llamaforge.errors import LlamaforgeError
from llamaforge.files import atomic_path, atomic_write_text, read_front_matter, read_json, read_text, read_yaml


@pytest.mark.parametrize("content, expect, message", [
    ('{"a": 1,\n "b": }', dict, r"bad\.json: not valid JSON \(Expecting value at line 2, column 7\)"),
    ("[1, 2]", dict, r"bad\.json: expected a JSON object, found list"),
    ('{"a": 1}', list, r"bad\.json: expected a JSON array, found dict"),
    ("", dict, r"bad\.json: empty file"),
])
def test_read_json_names_the_file_and_line(tmp_path, content, expect, message):
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(LlamaforgeError, match=message):
        read_json(tmp_path / "bad.json", expect=expect)


def test_read_json_and_text_take_what_is_valid(tmp_path):
    (tmp_path / "ok.json").write_bytes(b'\xef\xbb\xbf{"text": "caf\xc3\xa9"}')   # a BOM, UTF-8
    assert read_json(tmp_path / "ok.json") == {"text": "café"}
    assert read_json(tmp_path / "ok.json", expect=None) == {"text": "café"}
    (tmp_path / "gbk.txt").write_bytes("第一行\n第二行".encode("gbk"))
    with pytest.raises(LlamaforgeError, match=r"gbk\.txt:1: not UTF-8"):
        read_text(tmp_path / "gbk.txt")
    with pytest.raises(LlamaforgeError, match=r"missing\.txt: no such file"):
        read_text(tmp_path / "missing.txt")


def test_read_yaml_and_front_matter(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: 0.1\nepochs: [\n")
    with pytest.raises(LlamaforgeError, match=r"c\.yaml:3: invalid YAML"):
        read_yaml(tmp_path / "c.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert read_yaml(tmp_path / "empty.yaml") == {}
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# A model\n")
    assert read_front_matter(tmp_path / "README.md") == {"license": "mit"}
    (tmp_path / "README.md").write_text("---\nlicense: mit\n# never closed\n")
    with pytest.raises(LlamaforgeError, match="not closed"):
        read_front_matter(tmp_path / "README.md")
    assert read_front_matter(tmp_path / "none.md") == {}


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    atomic_write_text(target, "new")
    assert target.read_text() == "new"


def test_a_written_directory_has_the_modes_of_any_new_file(tmp_path):
    """safetensors writes its files 0600; an export is for others to read too (umask 022: 0644)."""
    import os

    import torch
    from safetensors.torch import save_file

    from llamaforge.files import atomic_output_dir
    umask = os.umask(0o022)
    try:
        with atomic_output_dir(tmp_path / "out") as d:
            save_file({"w": torch.zeros(2)}, str(d / "model.safetensors"))
            (d / "config.json").write_text("{}")
    finally:
        os.umask(umask)
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in (tmp_path / "out").iterdir()} == {
        "model.safetensors": "0o644", "config.json": "0o644"}
    assert oct((tmp_path / "out").stat().st_mode & 0o777) == "0o755"
