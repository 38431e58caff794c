"""`llamaforge evaluate --task`: perplexity against transformers, the task metrics against hand-worked
figures, task files and their errors."""
import json
import math

import pytest
import torch

from llamaforge.cli import main
from llamaforge.errors import LlamaforgeError
from llamaforge.evaluate.lm import sliding_windows
from llamaforge.evaluate.metrics import score_qa, score_summaries, score_translation, squad_normalize, token_f1
from llamaforge.evaluate.tasks import read_qa, read_summaries, read_translation
from llamaforge.formats.load import load

from conftest import hf_model_from_dir

TEXT = ("The llama is a domesticated South American camelid. Llamas are social animals and live in herds. "
        "Their wool is soft. 羊驼是一种南美洲的动物。 ") * 12


@pytest.mark.parametrize("n, window, stride", [(10, 4, 2), (100, 32, 16), (33, 32, 16), (5, 8, 4), (64, 16, 16)])
def test_sliding_windows_score_every_token_once(n, window, stride):
    scored = [t for _, end, first in sliding_windows(n, window, stride) for t in range(first, end)]
    assert scored == list(range(1, n))
    assert all(end - start <= window for start, end, _ in sliding_windows(n, window, stride))


def test_perplexity_matches_transformers(tiny_model_dir, tmp_path, capsys):
    text = tmp_path / "held_out.txt"
    text.write_text(TEXT)
    main(["evaluate", str(tiny_model_dir), "--task", "perplexity", "--data", str(text), "--window", "64",
          "--dtype", "fp32", "--format", "json"])
    ours = json.loads(capsys.readouterr().out)
    # transformers, the same windows: each scores only tokens the previous window did not.
    _, tok = load(tiny_model_dir)
    ids = torch.tensor(tok.encode(TEXT, add_special_tokens=False))
    hf = hf_model_from_dir(tiny_model_dir)
    total, n = 0.0, 0
    with torch.no_grad():
        for start, end, first in sliding_windows(len(ids), 64, 32):
            x = ids[start:end][None]
            labels = x.clone()
            labels[:, :first - start] = -100
            k = int((labels[:, 1:] != -100).sum())
            total += hf(input_ids=x, labels=labels).loss.item() * k
            n += k
    assert ours["n"] == n == len(ids) - 1
    assert ours["loss"] == pytest.approx(total / n, abs=1e-5)
    assert ours["perplexity"] == pytest.approx(math.exp(total / n), rel=1e-5)


def test_squad_metrics_by_hand():
    assert squad_normalize("The  Andes, of course!") == "andes of course"
    assert token_f1("in the Andes mountains", "Andes") == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    scores = score_qa(["Lima", "the city of Cusco", "Quito"], [["lima"], ["Cusco", "city of Cusco"], ["Bogota"]])
    assert scores == {"exact_match": pytest.approx(200 / 3), "f1": pytest.approx(200 / 3), "n": 3}


def test_translation_and_summary_metrics():
    refs = [["Der Hund sieht die Katze."], ["Das Lama ist weiß."]]
    perfect = score_translation([r[0] for r in refs], refs)
    assert perfect["bleu"] == pytest.approx(100) and perfect["chrf"] == pytest.approx(100) and perfect["n"] == 2
    worse = score_translation(["Der Hund sieht die Maus.", "Das Lama ist schwarz."], refs)
    assert 0 < worse["bleu"] < 100 and 0 < worse["chrf"] < 100
    s = score_summaries(["a llama won the prize", "rain in town"], [["a llama won the prize"], ["sun in town"]])
    assert s["rouge1"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert s["rouge2"] == pytest.approx(100 * (1 + 1 / 2) / 2)


def test_task_files_and_their_errors(tmp_path):
    squad = {"data": [{"paragraphs": [{"context": "Pablo lives in Cusco.",
                                       "qas": [{"id": "q1", "question": "Where?", "answers": [{"text": "Cusco"}]}]}]}]}
    (tmp_path / "qa.json").write_text(json.dumps(squad))
    (item,) = read_qa(tmp_path / "qa.json")
    assert item.references == ["Cusco"] and "Pablo lives in Cusco." in item.messages[0]["content"]
    squad["data"][0]["paragraphs"][0]["qas"][0]["answers"] = []
    (tmp_path / "qa.json").write_text(json.dumps(squad))
    with pytest.raises(LlamaforgeError, match="question q1: needs a context, a question and at least one answer"):
        read_qa(tmp_path / "qa.json")

    (tmp_path / "pairs.tsv").write_text("The dog.\tDer Hund.\nThe cat.\n")
    with pytest.raises(LlamaforgeError, match=r"pairs\.tsv:2: expected source<TAB>target"):
        read_translation(tmp_path / "pairs.tsv")
    (tmp_path / "src.txt").write_text("a\nb\n")
    (tmp_path / "tgt.txt").write_text("x\n")
    with pytest.raises(LlamaforgeError, match="has 2 lines but .*tgt.txt has 1"):
        read_translation(tmp_path / "src.txt", target=tmp_path / "tgt.txt")

    (tmp_path / "sum.jsonl").write_text('{"document": "text", "summary": "s"}\n{"document": "text"}\n')
    with pytest.raises(LlamaforgeError, match=r"sum\.jsonl:2: needs string fields"):
        read_summaries(tmp_path / "sum.jsonl")


def test_translation_languages_come_from_the_data_or_the_flags(tmp_path):
    from llamaforge.evaluate.tasks import translate_prompt
    (tmp_path / "named.tsv").write_text("en\tGerman\nThe dog.\tDer Hund.\n")
    (item,) = read_translation(tmp_path / "named.tsv")
    assert item.messages[0]["content"] == translate_prompt("The dog.", "German", "English")
    assert item.source.endswith("named.tsv:2")
    (item,) = read_translation(tmp_path / "named.tsv", target_lang="French")     # the flag wins
    assert "into French" in item.messages[0]["content"]
    (tmp_path / "test.en").write_text("The cat.\n")
    (tmp_path / "test.zh").write_text("猫。\n")
    (item,) = read_translation(tmp_path / "test.en", target=tmp_path / "test.zh")
    assert item.messages[0]["content"] == translate_prompt("The cat.", "Chinese", "English")
    (tmp_path / "plain.tsv").write_text("The dog.\tDer Hund.\n")
    with pytest.raises(LlamaforgeError, match=r"plain\.tsv: the data does not say which language .*--target-lang"):
        read_translation(tmp_path / "plain.tsv")
    assert "into German" in read_translation(tmp_path / "plain.tsv", target_lang="German")[0].messages[0]["content"]


def test_the_shipped_translation_set_says_it_is_english_to_german():
    from pathlib import Path

    import llamaforge
    items = read_translation(Path(llamaforge.__file__).parent / "datasets" / "translation" / "dev.tsv")
    assert len(items) == 60 and all("from English into German" in it.messages[0]["content"] for it in items)


@pytest.mark.parametrize("task, data, keys", [
    ("qa", "qa.json", {"exact_match", "f1", "n"}),
    ("translate", "pairs.tsv", {"bleu", "chrf", "n"}),
    ("summarize", "sum.jsonl", {"rouge1", "rouge2", "rougeL", "n"}),
    ("sft", "chat.jsonl", {"perplexity", "loss", "n"}),
])
def test_evaluate_prints_one_json_object(task, data, keys, tiny_model_dir, tmp_path, capsys):
    (tmp_path / "qa.json").write_text(json.dumps({"data": [{"paragraphs": [{"context": "Pablo lives in Cusco.", "qas": [
        {"id": f"q{i}", "question": "Where does Pablo live?", "answers": [{"text": "Cusco"}]} for i in range(3)]}]}]}))
    (tmp_path / "pairs.tsv").write_text("en\tde\nThe dog.\tDer Hund.\nThe cat.\tDie Katze.\n")
    (tmp_path / "sum.jsonl").write_text('{"document": "The llama won.", "summary": "A llama won."}\n')
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                                  {"role": "assistant", "content": "hello"}]}) + "\n")
    main(["evaluate", str(tiny_model_dir), "--task", task, "--data", str(tmp_path / data), "--format", "json",
          "--max-new-tokens", "4", "--predictions", str(tmp_path / "pred.jsonl")])
    out = json.loads(capsys.readouterr().out)
    assert set(out) == keys and out["n"] >= 1
    if task != "sft":
        assert len((tmp_path / "pred.jsonl").read_text().splitlines()) == out["n"]


def test_evaluate_without_task_on_a_model_says_what_to_do(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", str(tiny_model_dir), "--data", str(tmp_path / "x.csv")])
    assert "give --task" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_cross_entropy_is_pytorchs_forward_and_backward(monkeypatch, dtype, reduction):
    from llamaforge.evaluate.lm import ChunkedCrossEntropy, cross_entropy
    monkeypatch.setattr(ChunkedCrossEntropy, "ROW_ELEMENTS", 3 * 1000)   # 3 rows a chunk: 37 rows end mid-chunk
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(37, 1000, generator=g) * 4).to(dtype)
    target = torch.randint(0, 1000, (37,), generator=g)
    ours, ref = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss = cross_entropy(ours, target, reduction)
    expected = torch.nn.functional.cross_entropy(ref.float(), target, reduction=reduction)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    (loss * 3).backward()
    (expected * 3).backward()
    assert ours.grad.dtype == dtype
    torch.testing.assert_close(ours.grad, ref.grad, rtol=0 if dtype == torch.float32 else 8e-3, atol=1e-6 if dtype == torch.float32 else 1e-3)
