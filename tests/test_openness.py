"""`llamaforge openness`: licence and family identification from metadata the tests write, the
MOF / OSAID grading, conflicts and malformed cards, the JSON schema, Chinese output."""
import json

import pytest

from llamaforge.cli import main
from llamaforge.provenance.openness import COMPONENTS, VERDICTS, knowledge, report


def gguf_file(path, name, license=None):
    import gguf
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    if license:
        w.add_license(license)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hf_dir(path, name, card=None, license_file=None):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"_name_or_path": name, "model_type": "llama"}))
    if card is not None:
        (path / "README.md").write_text(card)
    if license_file is not None:
        (path / "LICENSE").write_text(license_file)
    return path


def check_schema(r: dict):
    """The JSON contract: licence, restrictions, published, MOF class, OSAID, verdict."""
    assert set(r["license"]) >= {"id", "name", "found_in", "osi_approved", "url"}
    assert isinstance(r["license"]["found_in"], list)
    for x in r["restrictions"]:
        assert set(x) == {"kind", "clause", "detail"} and all(isinstance(v, str) and v for v in x.values())
    assert set(r["published"]) == set(COMPONENTS) and all(v in (True, False, "unknown") for v in r["published"].values())
    assert r["mof_class"] in ("Class I", "Class II", "Class III", "none", "unknown")
    assert r["osaid"]["meets"] in ("meets", "fails", "unknown") and isinstance(r["osaid"]["reasons"], list)
    assert r["verdict"] in VERDICTS


def test_the_default_model(capsys):
    main(["openness", "--format", "json"])
    r = json.loads(capsys.readouterr().out)
    check_schema(r)
    assert r["license"]["id"] == "apache-2.0" and r["license"]["found_in"] == ["GGUF general.license"]
    assert r["family"]["id"] == "smollm2" and r["verdict"] == "open-source" and r["osaid"]["meets"] == "meets"
    assert r["summary"].startswith("Open source")


def test_openness_reads_metadata_only():
    """No weights, and not even torch: a multi-GB file answers at once (measured in the closing note)."""
    import subprocess
    import sys
    code = ("import sys; from llamaforge.cli import main; main(['openness', '--format', 'json']); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["verdict"] == "open-source"


@pytest.mark.parametrize("name, licence_text, where, expect", [
    ("meta-llama/Llama-2-7b-hf", "LLAMA 2 COMMUNITY LICENSE AGREEMENT\nLlama 2 Version Release Date: July 18, 2023",
     "file", dict(license="llama-2", verdict="open-weights-restricted", kinds={"user_cap", "output_training"}, mof="none")),
    ("meta-llama/Meta-Llama-3-8B", "license: other\nlicense_name: llama3", "card",
     dict(license="llama-3", verdict="open-weights-restricted", kinds={"naming_attribution"}, mof="none")),
    ("meta-llama/Llama-3.2-1B", "license: llama3.2", "card",
     dict(license="llama-3.2", verdict="open-weights-restricted", kinds={"field_of_use"}, mof="none")),
    ("google/gemma-2b", "license: gemma", "card",
     dict(license="gemma", verdict="open-weights-restricted", kinds={"acceptable_use"}, mof="none")),
    ("Qwen/Qwen2.5-3B", None, None, dict(license="qwen-research", verdict="not-open", kinds={"commercial_use"}, mof="none")),
    ("mistralai/Mistral-7B-v0.1", "license: apache-2.0", "card",
     dict(license="apache-2.0", verdict="open-weights-restricted", kinds=set(), mof="none")),
    ("allenai/OLMo-7B", "license: apache-2.0", "card", dict(license="apache-2.0", verdict="open-source", kinds=set(), mof="Class I")),
    ("EleutherAI/pythia-160m", "license: apache-2.0", "card", dict(license="apache-2.0", verdict="open-source", kinds=set(), mof="Class I")),
    ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", "license: apache-2.0", "card",
     dict(license="apache-2.0", verdict="open-source", kinds=set(), mof="Class I")),
    ("microsoft/phi-2", "license: mit", "card", dict(license="mit", verdict="open-weights-restricted", kinds=set(), mof="none")),
    ("someone/llama-port", "license: bsd-3-clause", "card", dict(license="bsd-3-clause", verdict="unknown", kinds=set(),
                                                                 mof="unknown")),
    ("someone/my-model", "license: cc-by-nc-4.0", "card", dict(license="cc-by-nc-4.0", verdict="not-open",
                                                               kinds={"commercial_use"}, mof="none")),
])
def test_licence_families(tmp_path, name, licence_text, where, expect):
    card = f"---\n{licence_text}\n---\n# {name}\n" if where == "card" else None
    r = report(str(hf_dir(tmp_path / "m", name, card=card, license_file=licence_text if where == "file" else None)))
    check_schema(r)
    assert r["license"]["id"] == expect["license"], r
    assert r["verdict"] == expect["verdict"], r["reasons"]
    assert expect["kinds"] <= {x["kind"] for x in r["restrictions"]}
    assert r["mof_class"] == expect["mof"]
    if expect["verdict"] != "open-source":   # an unknown family leaves the OSAID open unless the licence fails it
        assert r["osaid"]["meets"] == ("unknown" if expect["license"] == "bsd-3-clause" else "fails") and r["reasons"]
    url = knowledge()["licences"][expect["license"]]["url"]
    assert r["license"]["url"] == url and url.startswith("https://")


def test_a_meta_directory_of_the_first_llama(tmp_path):
    d = tmp_path / "llama-7b"
    d.mkdir()
    (d / "params.json").write_text(json.dumps({"dim": 4096, "n_layers": 32, "n_heads": 32}))
    r = report(str(d))
    assert r["license"]["id"] == "llama-1" and r["verdict"] == "not-open"
    assert "weights only on request" in r["reasons"] and "no commercial use" in r["reasons"]


def test_no_licence_metadata(tmp_path):
    r = report(str(gguf_file(tmp_path / "mystery.gguf", "my-own-model")))
    check_schema(r)
    assert r["license"]["id"] is None and r["license"]["found_in"] == []
    assert r["verdict"] == "unknown" and r["mof_class"] == "unknown" and r["osaid"]["meets"] == "unknown"
    assert set(r["published"].values()) == {"unknown"}


def test_conflicting_metadata_takes_the_restrictive_reading(tmp_path):
    r = report(str(gguf_file(tmp_path / "llama-2-7b.Q4_0.gguf", "Llama 2 7B", license="apache-2.0")))
    assert r["license"]["id"] == "llama-2" and r["verdict"] == "open-weights-restricted"
    assert r["conflicts"] and "apache-2.0" in r["conflicts"][0] and "Llama 2" in r["conflicts"][0]


def test_an_unknown_licence_is_reported_as_such(tmp_path):
    r = report(str(gguf_file(tmp_path / "m.gguf", "my-model", license="wtfpl-ish custom terms")))
    assert r["license"]["id"] is None and r["verdict"] == "unknown"
    assert any("not in the knowledge base" in n for n in r["notes"])


def test_a_malformed_model_card_is_a_finding(tmp_path):
    d = hf_dir(tmp_path / "m", "HuggingFaceTB/SmolLM2-135M", card="---\nlicense: [apache-2.0\n---\n# card\n")
    r = report(str(d))
    assert any("not valid YAML" in n for n in r["notes"])
    assert r["license"]["id"] == "apache-2.0" and r["license"]["found_in"] == ["knowledge base (model family)"]


def test_an_adapter_inherits_its_base(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "default"}))
    r = report(str(tmp_path))
    assert r["derived_from"] == "default" and r["license"]["id"] == "apache-2.0" and r["format"] == "adapter"
    assert any("derived from default" in n for n in r["notes"])


def test_chinese_output(capsys):
    main(["openness", "--lang", "zh"])
    out = capsys.readouterr().out
    assert "开源" in out and "许可证" in out and "Apache License 2.0" in out
    main(["openness", "--format", "json", "--lang", "zh"])
    assert json.loads(capsys.readouterr().out)["summary"].startswith("开源")


@pytest.mark.parametrize("model", ["default", "meta-llama/Llama-2-7b-hf", "google/gemma-2b"])
def test_chinese_output_translates_terms_reasons_and_aligns(model, tmp_path):
    """Clause details, kinds, component names, OSAID reasons and verdicts in Chinese; the value
    column starts at one display column whatever the label's width; no empty "(-)"."""
    from llamaforge.provenance.openness import format_report, width
    path = "default" if model == "default" else str(hf_dir(tmp_path / "m", model))
    r = report(path, lang="zh")
    text = format_report(r, "zh")
    english = report(path)
    for x, en in zip(r["restrictions"], english["restrictions"], strict=True):
        assert x["detail"] in text and not x["detail"].isascii() and en["detail"] not in text
    assert not any(c in text for c in ("weights yes", "inference code", "use is restricted", "not published", "(-)"))
    if r["osaid"]["meets"] == "fails":
        assert all(not reason.isascii() for reason in r["osaid"]["reasons"]), r["osaid"]["reasons"]
    starts = set()
    for line in text.splitlines()[:4]:   # verdict, family, licence, access: "label<pad>value"
        label = line.split(" ")[0]
        starts.add(width(line[:len(label)]) + len(line[len(label):]) - len(line[len(label):].lstrip(" ")))
    assert starts == {12}, text
    assert report(path)["osaid"]["reasons"] == [] or report(path)["osaid"]["reasons"][0].isascii()   # English by default


def test_every_fact_has_a_source_and_a_date():
    """A licence names the text it was compared with and when; an entry not yet compared says so
    (checked: null) rather than carrying a date."""
    import datetime
    kb = knowledge()
    for entry in [*kb["licences"].values(), *kb["families"].values()]:
        assert entry["checked"] is None or isinstance(entry["checked"], datetime.date), entry["name"]
    for lid, lic in kb["licences"].items():
        assert lic["url"].startswith("https://") and lic["source"] and "checked" in lic, lid
        assert all(r["kind"] in ("commercial_use", "user_cap", "acceptable_use", "output_training",
                                 "naming_attribution", "field_of_use", "redistribution") for r in lic["restrictions"])
    for fid, fam in kb["families"].items():
        assert fam["licence"] in kb["licences"] and fam["sources"] and "checked" in fam, fid
        assert set(fam["published"]) == set(COMPONENTS), fid


@pytest.mark.parametrize("name, card, licence, verdict", [
    # the model's own non-commercial terms win over its family's
    ("meta-llama/Llama-3.2-1B", "license: cc-by-nc-4.0", "cc-by-nc-4.0", "not-open"),
    # a licence the knowledge base does not know is not replaced by the family's
    ("TinyLlama/TinyLlama-1.1B", "license: other\nlicense_name: acme-noncommercial", None, "unknown"),
    # names are matched on whole tokens: llama-30b is LLaMA 1, not Llama 3
    ("huggyllama/llama-30b", None, "llama-1", "not-open"),
    # a restrictive licence on an unknown family: weights in hand, not open source
    ("someone/my-finetune", "license: llama3.2", "llama-3.2", "open-weights-restricted"),
    ("someone/Llama-3.3-70B", None, None, "unknown"),
])
def test_hard_cases(tmp_path, name, card, licence, verdict):
    r = report(str(hf_dir(tmp_path / "m", name, card=f"---\n{card}\n---\n" if card else None)))
    check_schema(r)
    assert (r["license"]["id"], r["verdict"]) == (licence, verdict), (r["conflicts"], r["notes"], r["reasons"])


def test_a_scratch_run_is_not_judged_by_its_directory_name(tmp_path):
    run = tmp_path / "tinyllama-scratch"
    run.mkdir()
    (run / "config.yaml").write_text("model: null\n")
    r = report(str(run))
    assert r["family"] is None and r["verdict"] == "unknown"


def test_an_adapter_of_a_hub_model_is_judged_by_the_base_name(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA",
                                                              "base_model_name_or_path": "meta-llama/Llama-3.2-1B"}))
    r = report(str(tmp_path))
    assert r["license"]["id"] == "llama-3.2" and r["verdict"] == "open-weights-restricted"
    assert "weights gated behind accepting the licence" in r["reasons"]


def test_an_entry_not_compared_with_its_source_is_called_unverified(tmp_path, capsys):
    from llamaforge.provenance.openness import format_report
    r = report(str(hf_dir(tmp_path / "m", "huggyllama/llama-7b")))
    assert r["family"]["id"] == "llama-1" and r["family"]["checked"] is None and r["family"]["verified"] is False
    assert r["license"]["verified"] is True and r["license"]["checked"] == "2026-12-02"
    assert "unverified" in format_report(r) and "未核实" in format_report(report(str(tmp_path / "m"), lang="zh"), "zh")


def test_the_tongyi_qianwen_licences_are_told_apart():
    from llamaforge.provenance.openness import identify_licence
    assert identify_licence("Tongyi Qianwen RESEARCH LICENSE AGREEMENT ... FOR NON-COMMERCIAL PURPOSES ONLY") == "qwen-research"
    assert identify_licence("Tongyi Qianwen LICENSE AGREEMENT") == "tongyi-qianwen"
    kinds = {r["kind"] for r in knowledge()["licences"]["tongyi-qianwen"]["restrictions"]}
    assert "output_training" in kinds and knowledge()["licences"]["qwen-research"]["commercial_use"] is False


HUB = [   # (repo id, config.json keys the hub's copy carries, the card's front matter, expected)
    ("Qwen/Qwen2-7B-Instruct", {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"},
     "license: apache-2.0\nbase_model: Qwen/Qwen2-7B", ("qwen2", "apache-2.0", "open-weights-restricted")),
    ("Qwen/Qwen2-72B", {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"},
     "license: other\nlicense_name: tongyi-qianwen", ("qwen2-72b", "tongyi-qianwen", "open-weights-restricted")),
    ("Qwen/Qwen2.5-3B", {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"},
     "license: other\nlicense_name: qwen-research", ("qwen2.5-3b", "qwen-research", "not-open")),
    ("mistralai/Mistral-7B-v0.3", {"architectures": ["MistralForCausalLM"], "model_type": "mistral"},
     "license: apache-2.0", ("mistral", "apache-2.0", "open-weights-restricted")),
    ("01-ai/Yi-34B", {"architectures": ["LlamaForCausalLM"], "model_type": "llama"},
     "license: apache-2.0", ("yi", "apache-2.0", "open-weights-restricted")),
    ("deepseek-ai/deepseek-llm-7b-base", {"architectures": ["LlamaForCausalLM"], "model_type": "llama"},
     "license: other\nlicense_name: deepseek\nlicense_link: LICENSE", ("deepseek-llm", "deepseek", "open-weights-restricted")),
    ("internlm/internlm2_5-7b-chat", {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2"},
     "license: other", ("internlm", None, None)),
    ("baichuan-inc/Baichuan2-7B-Base", {"architectures": ["BaichuanForCausalLM"], "model_type": "baichuan"},
     "", ("baichuan2", "baichuan2", "not-open")),
]


@pytest.mark.parametrize("repo, config, front, expect", HUB, ids=[h[0] for h in HUB])
def test_a_hub_cache_snapshot_is_known_by_its_family(repo, config, front, expect, tmp_path):
    """A model directory as the hub's cache leaves it: a commit hash for a name, the repository
    only in the cache's path, a card without the model's name."""
    org, name = repo.split("/")
    d = tmp_path / f"models--{org}--{name}" / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))
    if front:
        (d / "README.md").write_text(f"---\n{front}\n---\n# A model\n")
    r = report(str(d))
    family, licence, verdict = expect
    assert r["family"]["id"] == family
    if licence:
        assert r["license"]["id"] == licence and r["verdict"] == verdict, r["reasons"]
    else:   # "license: other" and nothing more: the claim is unknown, the family's licence is said beside it
        assert r["verdict"] in VERDICTS and any("InternLM" in c for c in r["conflicts"]), r


def test_an_architecture_alone_names_a_family_but_not_its_licence(tmp_path):
    """A directory that nothing names (not in the hub cache, no card): Qwen2's architecture is
    shared by models under three licences, so the family is reported and the licence is not guessed."""
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}))
    r = report(str(d))
    assert r["family"]["id"] == "qwen2" and r["license"]["id"] is None and r["verdict"] == "unknown"
    assert any("architecture only" in n for n in r["notes"])
