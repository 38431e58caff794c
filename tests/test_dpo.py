"""Preference tuning: the pairs, the losses (DPO, IPO, SimPO), the reference model, runs and
`evaluate --task preference`."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llamaforge.cli import main
from llamaforge.data.batching import pad_labelled
from llamaforge.data.preferences import encode_pair, read_pairs, scored_rows
from llamaforge.errors import LlamaforgeError
from llamaforge.evaluate.lm import answer_logps
from llamaforge.formats.load import load
from llamaforge.model.adapters import LoRAConfig, adapters_disabled, add_lora
from llamaforge.train.dpo import DPOConfig, PreferenceTask, preference_loss

from conftest import randomize_parameters

SHIPPED = Path(__file__).resolve().parent.parent / "llamaforge" / "datasets" / "preferences"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("row, message", [
    ({"prompt": "hi", "chosen": "a"}, r"x\.jsonl:2: missing field 'rejected'"),
    ({"prompt": [{"role": "king", "content": "hi"}], "chosen": "a", "rejected": "b"}, r"x\.jsonl:2: 'prompt' message 1"),
    ({"prompt": "hi", "chosen": "same", "rejected": "same"}, r"x\.jsonl:2: 'chosen' and 'rejected' are the same"),
    ({"prompt": "hi", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}, r"x\.jsonl:2: answers given as"),
])
def test_bad_pairs_are_named_by_line(tmp_path, row, message):
    good = {"prompt": "hi", "chosen": "a", "rejected": "b"}
    with pytest.raises(LlamaforgeError, match=message):
        read_pairs(write_jsonl(tmp_path / "x.jsonl", [good, row]))


def test_the_shipped_pairs():
    from llamaforge.formats.load import load_checkpoint
    tok = load_checkpoint("default", weights=False).tokenizer   # SmolLM2's own chat template
    train, dev = read_pairs(SHIPPED / "train.jsonl"), read_pairs(SHIPPED / "dev.jsonl")
    assert len(train) + len(dev) >= 250 and len(dev) >= 25
    text = " ".join(json.dumps(p.prompt, ensure_ascii=False) for p in train)
    assert "法国" in text and "capital of France" in text   # English and Chinese
    train_q = {p.prompt[-1]["content"] for p in train}
    assert not any(p.prompt[-1]["content"] in train_q for p in dev)
    for pair in dev[:5]:
        prompt, chosen, rejected = encode_pair(tok, pair, 512)
        # The answer is the assistant's turn as the template renders it, end marker included,
        # and prompt + answer tokenize as the whole conversation does.
        assert tok.decode(chosen) == pair.chosen[0]["content"] + "<|im_end|>\n"
        assert tok.decode(prompt).endswith("<|im_start|>assistant\n")
        whole = tok.apply_chat_template(pair.prompt + pair.rejected, add_generation_prompt=False)
        assert prompt + rejected == tok.encode(whole, add_special_tokens=False)


def tiny_lora(tiny_model_dir):
    model, tok = load(tiny_model_dir, dtype="fp32")
    add_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.0))
    return model, tok


def test_lora_reference_is_the_base_and_the_first_loss_is_log_2(tiny_model_dir):
    model, tok = tiny_lora(tiny_model_dir)
    pairs = [encode_pair(tok, p, 128) for p in read_pairs(SHIPPED / "dev.jsonl")[:4]]
    ids, labels = pad_labelled(scored_rows(pairs), tok.pad_id)
    base, _ = load(tiny_model_dir, dtype="fp32")
    # LoRA's B starts at zero: policy = reference, every pair's DPO loss is log 2.
    task = PreferenceTask(DPOConfig(), pairs, pairs, tok, None)
    loss, margin = task.losses(model, pairs, "train", list(range(4)))
    torch.testing.assert_close(loss, torch.full((4,), math.log(2)))
    randomize_parameters(model, 0.5)   # now the adapters change the model ...
    with torch.no_grad(), adapters_disabled(model):   # ... but not with them switched off
        torch.testing.assert_close(answer_logps(model, ids, labels)[0], answer_logps(base, ids, labels)[0])
    assert not torch.allclose(answer_logps(model, ids, labels)[0], answer_logps(base, ids, labels)[0])


def test_answer_logps_and_simpo_by_hand_on_two_tokens(tiny_model_dir):
    """SimPO (Meng et al. 2024, eq. 6): -log sigmoid(beta/|yw| log p(yw|x) - beta/|yl| log p(yl|x) - gamma)."""
    model, _ = load(tiny_model_dir, dtype="fp32")
    prompt, yw, yl = [5, 6, 7], [8, 9], [10, 11]
    ids, labels = pad_labelled(scored_rows([(prompt, yw, yl)]), 0)
    logps, n = answer_logps(model, ids, labels)
    assert n.tolist() == [2, 2]
    with torch.no_grad():
        def by_hand(answer):
            logp = F.log_softmax(model(torch.tensor([prompt + answer]), fp32_logits=True)[0], -1)
            return float(logp[2, answer[0]] + logp[3, answer[1]])   # position t predicts token t + 1
        w, l_ = by_hand(yw), by_hand(yl)
    assert logps.tolist() == pytest.approx([w, l_], abs=1e-5)
    beta, gamma = 2.0, 0.5
    cfg = DPOConfig(loss="simpo", beta=beta, simpo_gamma=gamma)
    loss, _ = preference_loss(logps[0:1], logps[1:2], None, None, n[0:1].float(), n[1:2].float(), cfg)
    expected = -math.log(1 / (1 + math.exp(-(beta / 2 * w - beta / 2 * l_ - gamma))))
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_dpo_and_ipo_formulas():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-3.0, -5.0, -4.0, -4.5))
    n = torch.tensor([2.0])
    loss, margin = preference_loss(pc, pr, rc, rr, n, n, DPOConfig(beta=0.1))
    logits = (-3.0 + 4.0) - (-5.0 + 4.5)
    assert float(loss) == pytest.approx(-math.log(1 / (1 + math.exp(-0.1 * logits))))
    assert float(margin) == pytest.approx(0.1 * logits)
    loss, _ = preference_loss(pc, pr, rc, rr, n, n, DPOConfig(loss="ipo", beta=0.1))
    assert float(loss) == pytest.approx((logits / 2 - 1 / 0.2) ** 2)   # per-token averages


def dpo_args(model_dir, out, *extra):
    return ["finetune", "dpo", "--model", str(model_dir), "--train", str(SHIPPED / "train.jsonl"), "--dev",
            str(SHIPPED / "dev.jsonl"), "--out", str(out), "--dtype", "fp32", "--max-steps", "6", "--eval-every", "3",
            "--lora-rank", "4", *extra]


def test_lora_dpo_run_and_evaluate(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "dpo"
    main(dpo_args(tiny_model_dir, out, "--lr", "1e-2"))
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(final) >= {"loss", "accuracy", "margin", "n"} and final["n"] == 30
    assert {p.name for p in (out / "best").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["step"] for e in metrics["evals"]] == [3, 6]
    assert metrics["evals"][0]["loss"] != pytest.approx(math.log(2))   # it learned something
    main(["evaluate", str(out), "--task", "preference", "--data", str(SHIPPED / "dev.jsonl"), "--format", "json"])
    scores = json.loads(capsys.readouterr().out)
    assert set(scores) == {"accuracy", "margin", "n", "reward_accuracy", "reward_margin"} and scores["n"] == 30
    # The implicit reward of the run against its base is the one training evaluated.
    best = next(e for e in metrics["evals"] if e["step"] == metrics["final"]["dev"]["best_step"])
    assert scores["reward_accuracy"] == pytest.approx(best["accuracy"], abs=1e-6)
    assert scores["reward_margin"] == pytest.approx(best["margin"], rel=1e-3, abs=1e-5)


def test_full_dpo_caches_the_reference_and_resumes(tiny_model_dir, tmp_path):
    out = tmp_path / "full"
    main(dpo_args(tiny_model_dir, out, "--method", "full", "--lr", "1e-4", "--max-steps", "3"))
    ref_file = out / "reference_logps.safetensors"
    from safetensors.torch import load_file
    ref = load_file(str(ref_file))
    assert ref["train"].shape == (270, 2) and ref["dev"].shape == (30, 2)
    main(["finetune", "dpo", "--out", str(out), "--resume", "--max-steps", "6"])
    assert load_file(str(ref_file))["train"].equal(ref["train"])   # the base's, not the trained model's
    assert json.loads((out / "metrics.json").read_text())["evals"][-1]["step"] == 6


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_one_batch_equals_trl(tiny_model_dir, tmp_path, loss_type):
    """TRL's DPOTrainer and ours on the same tiny model, weights and pairs: the same tokens, and
    the same loss of one batch (policy moved away from the reference so that the loss is not log 2)."""
    import shutil

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    rows = [json.loads(line) for line in (SHIPPED / "dev.jsonl").read_text().splitlines()[:4]]
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    policy_dir = tmp_path / "policy"
    policy.save_pretrained(policy_dir)
    for f in tiny_model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, policy_dir / f.name)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    args = TRLConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, beta=0.1, loss_type=[loss_type],
                     report_to=[], use_cpu=True, bf16=False, max_length=None)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))
    batch = next(iter(trainer.get_train_dataloader()))
    expected = float(trainer.compute_loss(trainer.model, batch))

    ours, tok = load(policy_dir, dtype="fp32")
    base, _ = load(tiny_model_dir, dtype="fp32")
    trl_rows = [(ids[real == 1].tolist(), answer[real == 1].tolist()) for ids, answer, real in
                zip(batch["input_ids"], batch["completion_mask"], batch["attention_mask"], strict=True)]
    encoded = [encode_pair(tok, p, 512) for p in read_pairs(write_jsonl(tmp_path / "p.jsonl", rows))]
    assert sorted(ids for ids, _ in trl_rows) == sorted(p + a for p, c, r in encoded for a in (c, r))   # same tokens
    ids, labels = pad_labelled([(ids, [t if m else -100 for t, m in zip(ids, mask, strict=True)])
                                for ids, mask in trl_rows], tok.pad_id)
    with torch.no_grad():
        (policy_logps, n), (ref_logps, _) = answer_logps(ours, ids, labels), answer_logps(base, ids, labels)
    half = len(trl_rows) // 2   # TRL's batch: the chosen answers, then the rejected ones
    loss, _ = preference_loss(policy_logps[:half], policy_logps[half:], ref_logps[:half], ref_logps[half:],
                              n[:half].float(), n[half:].float(), DPOConfig(loss=loss_type, beta=0.1))
    assert float(loss.mean()) == pytest.approx(expected, rel=1e-5, abs=1e-6)
