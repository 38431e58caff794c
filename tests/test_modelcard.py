"""Model cards with provenance, `llamaforge reproduce`, and licence warnings."""
import json
import shutil

import pytest
import yaml

from llamaforge.cli import main
from llamaforge.provenance.modelcard import licence_warnings, read_card, sha256
from llamaforge.provenance.openness import report


def chat_file(path, n=40):
    rows = [{"messages": [{"role": "user", "content": f"question {i}"},
                          {"role": "assistant", "content": "the answer is always llama"}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def front_matter(card):
    text = card.read_text()
    return yaml.safe_load(text.split("\n---", 1)[0][3:]), text


@pytest.fixture(scope="module")
def sft_run(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("card")
    train, dev = chat_file(d / "train.jsonl"), chat_file(d / "dev.jsonl", 8)
    out = d / "run"
    args = ["finetune", "sft", "--train", str(train), "--dev", str(dev), "--out", str(out), "--model", str(tiny_model_dir),
            "--max-steps", "4", "--eval-every", "2", "--dtype", "fp32", "--samples", "1", "--lr", "1e-2"]
    main(args)
    return out, train, dev, args


def test_the_card_carries_provenance(sft_run, tiny_model_dir):
    out, train, dev, args = sft_run
    for card in (out / "README.md", out / "best" / "README.md"):
        front, text = front_matter(card)
        assert {"license", "base_model", "datasets", "metrics", "tags", "library_name"} <= set(front)
        assert front["base_model"] == str(tiny_model_dir) and front["library_name"] == "peft"
        assert front["datasets"] == ["train.jsonl", "dev.jsonl"] and "perplexity" in front["metrics"]
        prov = front["llamaforge"]
        assert {f["path"]: f["sha256"] for f in prov["data"]} == {str(train): sha256(train), str(dev): sha256(dev)}
        assert prov["config"]["seed"] == prov["seed"] == 0 and prov["config"]["max_steps"] == 4
        assert prov["command"] == " ".join(["llamaforge", *args])
        assert prov["torch"] and prov["version"]
        assert sha256(train) in text and "## Metrics" in text and "No licence was found" in text
    assert read_card(out)["metrics"] == json.loads((out / "metrics.json").read_text())["final"]


def test_reproduce_from_the_card_alone(sft_run, tmp_path, capsys):
    out, _, _, _ = sft_run
    capsys.readouterr()
    main(["reproduce", str(out), "--out", str(tmp_path / "again")])
    result = json.loads(capsys.readouterr().out)
    assert result["match"] is True and result["original"] == result["reproduced"]
    assert (tmp_path / "again" / "best").is_dir()


def test_reproduce_refuses_changed_data(sft_run, tmp_path, capsys):
    out, train, _, _ = sft_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    original = train.read_text()
    try:
        train.write_text(original + json.dumps({"prompt": "x", "completion": "y"}) + "\n")
        with pytest.raises(SystemExit):
            main(["reproduce", str(copy), "--out", str(tmp_path / "again")])
        assert "SHA-256 differs" in capsys.readouterr().err
    finally:
        train.write_text(original)


def test_a_card_inherits_the_base_licence_and_its_duties(tmp_path):
    from llamaforge.provenance.modelcard import write_model_card
    base = tmp_path / "Llama-3.2-1B"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"_name_or_path": "meta-llama/Llama-3.2-1B"}))
    out = tmp_path / "card"
    out.mkdir()
    write_model_card(out, recipe="sft", title="t", base_model=str(base), config={"seed": 1}, data=[], metrics={"loss": 1.0})
    front, text = front_matter(out / "README.md")
    assert front["license"] == "llama3.2" and "Built with Llama" in text and "begin" in text


def test_licence_warnings(tmp_path):
    llama = tmp_path / "llama32"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"_name_or_path": "meta-llama/Llama-3.2-1B"}))
    terms = report(str(llama))
    assert any("begin with \"Llama\"" in w for w in licence_warnings(terms, tmp_path / "my-chatbot"))
    assert licence_warnings(terms, tmp_path / "Llama-chatbot") == []
    nc = tmp_path / "nc"
    nc.mkdir()
    (nc / "config.json").write_text(json.dumps({"_name_or_path": "someone/model"}))
    (nc / "README.md").write_text("---\nlicense: cc-by-nc-4.0\n---\n")
    assert any("forbids commercial use" in w for w in licence_warnings(report(str(nc)), tmp_path / "x", "apache-2.0"))
    assert licence_warnings(report(str(nc)), tmp_path / "x", "cc-by-nc-4.0") == []


def test_export_writes_a_card_and_warns(tiny_model_dir, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(tiny_model_dir, src)
    (src / "README.md").write_text("---\nlicense: cc-by-nc-4.0\n---\n# a non-commercial model\n")
    main(["export", str(src), "--to", "hf", str(tmp_path / "out"), "--license", "apache-2.0"])
    assert "licence warning" in capsys.readouterr().err
    front, _ = front_matter(tmp_path / "out" / "README.md")
    assert front["license"] == "apache-2.0" and front["base_model"] == str(src)


def test_a_gguf_export_gets_its_card_beside_it(tiny_model_dir, tmp_path, capsys):
    main(["export", str(tiny_model_dir), "--to", "gguf", str(tmp_path / "tiny.gguf"), "--license", "mit"])
    front, _ = front_matter(tmp_path / "tiny.README.md")
    assert front["license"] == "mit" and front["llamaforge"]["config"]["to"] == "gguf"
    from llamaforge.formats.gguf_header import read_gguf
    assert read_gguf(tmp_path / "tiny.gguf")[0]["general.license"] == "mit"
