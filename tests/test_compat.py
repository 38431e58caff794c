"""Run directories written by an earlier llamaforge still load and compute what they computed then.

`fixtures/runs_before_layout/` holds three small runs on the default model (a LoRA classifier, a
LoRA SFT run and a prefix-tuning run, each 3 steps) made by llamaforge at commit a334a39, before
the package was split into subpackages, and what that llamaforge printed for them in fp32
(`expected.json`): class probabilities from `predict`, perplexity from `evaluate --task`.
"""
import json
import shutil
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "runs_before_layout"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text(encoding="utf-8"))


@pytest.fixture
def old_runs(tmp_path):
    """A copy, so that nothing a test does can change the fixture."""
    shutil.copytree(FIXTURES, tmp_path / "runs")
    return tmp_path / "runs"


def test_an_old_classifier_run_predicts_as_it_did(old_runs):
    from llamaforge.train.classify import predict_classifier
    expected = EXPECTED["classify_predict"]
    rows = predict_classifier(old_runs / "classify", texts=[r["text"] for r in expected], dtype="fp32")
    for ours, theirs in zip(rows, expected, strict=True):
        assert ours["label"] == theirs["label"]
        for key in ("p_negative", "p_positive"):
            assert ours[key] == pytest.approx(theirs[key], abs=1e-4), (ours["text"], key)


@pytest.mark.parametrize("run", ["sft", "prefix"])
def test_an_old_generative_run_scores_as_it_did(old_runs, run):
    from llamaforge.evaluate.scoring import evaluate_model
    scores = evaluate_model(str(old_runs / run), "perplexity", old_runs / "text.txt", dtype="fp32")
    expected = EXPECTED[f"{run}_perplexity"]
    assert scores["n"] == expected["n"]
    assert scores["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-4)


def test_inputs_are_checked_before_a_model_loads(old_runs, tmp_path, monkeypatch):
    """A missing file, a missing column or a bad output name is reported at once, not after a
    model has loaded (18 s for a large one)."""
    import llamaforge.evaluate.scoring as scoring
    import llamaforge.train.classify as classify
    from llamaforge.errors import LlamaforgeError

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")
    monkeypatch.setattr(classify, "load", no_model)
    monkeypatch.setattr(scoring, "load", no_model)
    run = old_runs / "classify"
    (tmp_path / "d.csv").write_text("sentence,label\nok,positive\n")
    for call, message in [
        (lambda: classify.evaluate_classifier(run, tmp_path / "test.csv"), r"test\.csv: no such file"),
        (lambda: classify.evaluate_classifier(run, tmp_path / "d.csv"), r"d\.csv:1: no column 'text'"),
        (lambda: classify.predict_classifier(run, texts=["x"], out=tmp_path / "p.txt"), r"p\.txt: write predictions"),
        (lambda: classify.predict_classifier(run, data=tmp_path / "none.csv"), r"none\.csv: no such file"),
        (lambda: scoring.evaluate_model("default", "qa", tmp_path / "qa.json"), r"qa\.json: no such file"),
        (lambda: scoring.evaluate_model("default", "perplexity", tmp_path / "t.txt"), r"t\.txt: no such file"),
        (lambda: scoring.evaluate_model("default", "sft", tmp_path / "d.csv"), r"d\.csv:2: cannot tell the format"),
    ]:
        with pytest.raises(LlamaforgeError, match=message):
            call()
