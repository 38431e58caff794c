"""AdaLoRA: the rank schedule, the importance scores, the masks and the regulariser step for step
as PEFT's AdaLoraModel computes them on the same tiny model, weights and data; runs that save
what PEFT loads to the same logits; classification, SFT and DPO with --method adalora."""
import copy
import json

import pytest
import torch

from llamaforge.cli import main
from llamaforge.evaluate.lm import next_token_loss
from llamaforge.formats.load import build_model, load
from llamaforge.model.adapters import AdaLoRALinear, AdaLoRASchedule, LoRAConfig, add_lora
from llamaforge.train.adalora import RankAllocator

from conftest import random_model, sentiment_file

TARGETS = ["q_proj", "v_proj", "down_proj"]


def peft_and_ours(tiny_bpe, schedule: dict):
    from peft import AdaLoraConfig, get_peft_model
    ckpt, hf = random_model("tiny", tiny_bpe)
    config = AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS,
                           task_type="CAUSAL_LM", **schedule)
    theirs = get_peft_model(copy.deepcopy(hf), config).train()
    ours = build_model(ckpt, dtype=torch.float32)
    add_lora(ours, LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=TARGETS, adalora=AdaLoRASchedule(
        target_rank=2, tinit=schedule["tinit"], tfinal=schedule["tfinal"], delta_t=schedule.get("deltaT", 1),
        total_step=schedule["total_step"])))
    # PEFT's random A and B (E starts at zero in both) into ours.
    peft_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, layer in ours.named_modules():
            if isinstance(layer, AdaLoRALinear):
                for part in "AEB":
                    getattr(layer, f"lora_{part}").copy_(peft_params[f"base_model.model.model.{name}.lora_{part}.default"])
    return theirs, ours.train()


def test_the_rank_schedule_matches_peft_step_for_step(tiny_bpe):
    schedule = {"total_step": 14, "tinit": 2, "tfinal": 4, "deltaT": 2}
    theirs, ours = peft_and_ours(tiny_bpe, schedule)
    allocator = RankAllocator(ours)
    opt_theirs = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=2e-2)
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=2e-2)
    g = torch.Generator().manual_seed(0)
    patterns_seen = []
    for step in range(schedule["total_step"]):
        ids = torch.randint(3, 500, (4, 16), generator=g)
        loss_theirs = theirs(input_ids=ids, labels=ids).loss   # + PEFT's orthogonal regulariser
        loss_theirs.backward()
        opt_theirs.step()
        theirs.base_model.update_and_allocate(step)
        opt_theirs.zero_grad()
        loss_ours = next_token_loss(ours, ids, ids)[0] + 0.5 * allocator.penalty()
        loss_ours.backward()
        opt_ours.step()
        allocator.step(step)
        opt_ours.zero_grad()
        assert loss_ours.item() == pytest.approx(loss_theirs.item(), abs=1e-5), step
        pattern = theirs.peft_config["default"].rank_pattern
        if pattern:
            peft_kept = {k.removeprefix("model.").removesuffix(".lora_E.default"): v for k, v in pattern.items()}
            assert allocator.kept() == peft_kept, step
            patterns_seen.append(json.dumps(peft_kept, sort_keys=True))
        e_theirs = {n: p for n, p in theirs.named_parameters() if "lora_E" in n}
        for name, layer in allocator.layers:
            assert torch.allclose(layer.lora_E, e_theirs[f"base_model.model.model.{name}.lora_E.default"], atol=1e-5)
    # The budget fell from 4 to 2 per matrix, masked at several steps, and ended where it should.
    assert len(set(patterns_seen)) >= 2
    assert sum(sum(k) for k in allocator.kept().values()) == 2 * len(allocator.layers)
    assert allocator.budget(schedule["tinit"] + 1)[0] < 4 * len(allocator.layers)


def test_the_budget_follows_the_cubic_schedule():
    allocator = RankAllocator.__new__(RankAllocator)
    allocator.schedule = AdaLoRASchedule(target_rank=8, tinit=10, tfinal=20, total_step=100)
    allocator.init_budget, allocator.target_budget = 12 * 10, 8 * 10
    assert allocator.budget(10) == (120, False)                      # warm-up: all of it, no masks
    assert allocator.budget(11)[0] == int(40 * (1 - 1 / 70) ** 3 + 80)
    assert allocator.budget(45)[0] == int(40 * 0.5 ** 3 + 80)        # half way: an eighth of the surplus
    assert allocator.budget(81) == (80, True)                        # the final phase: the target


def test_an_adalora_sft_run_saves_what_peft_loads(tiny_model_dir, tmp_path, capsys):
    from peft import PeftModel
    from test_sft import chat_rows, write_jsonl

    from conftest import hf_model_from_dir, peft_agreement
    train = write_jsonl(tmp_path / "train.jsonl", chat_rows(96))
    dev = write_jsonl(tmp_path / "dev.jsonl", chat_rows(16, seed=1))
    out = tmp_path / "ada"
    main(["finetune", "sft", "--train", str(train), "--dev", str(dev), "--out", str(out), "--model",
          str(tiny_model_dir), "--dtype", "fp32", "--batch-size", "8", "--seed", "0", "--method", "adalora",
          "--init-rank", "6", "--target-rank", "3", "--lr", "5e-2", "--epochs", "3", "--eval-every", "12"])
    capsys.readouterr()
    config = json.loads((out / "best" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and (config["init_r"], config["target_r"]) == (6, 3)
    assert (config["total_step"], config["tinit"], config["tfinal"]) == (36, 4, 7)
    # The final phase reached: 3 triplets a matrix on average, not necessarily 3 each.
    kept = [sum(k) for k in config["rank_pattern"].values()]
    assert sum(kept) == 3 * len(kept)
    losses = [e["loss"] for e in json.loads((out / "metrics.json").read_text())["evals"]]
    assert losses[-1] < losses[0] - 0.1, losses
    ours, _ = load(out, dtype="fp32")
    theirs = PeftModel.from_pretrained(hf_model_from_dir(tiny_model_dir), str(out / "best")).eval()
    diff, moved = peft_agreement(ours, theirs, hf_model_from_dir(tiny_model_dir))
    assert diff < 1e-4 and moved > 1e-3


def test_adalora_classification_evaluates_as_it_trained(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "clf"
    main(["finetune", "classify", "--model", str(tiny_model_dir), "--train", str(sentiment_file("train")),
          "--dev", str(sentiment_file("dev")), "--out", str(out), "--batch-size", "16", "--dtype", "fp32",
          "--method", "adalora", "--init-rank", "4", "--target-rank", "2", "--max-steps", "12", "--eval-every", "6",
          "--lr", "3e-3"])
    capsys.readouterr()
    main(["evaluate", str(out), "--data", str(sentiment_file("dev")), "--format", "json"])
    scores = json.loads(capsys.readouterr().out)
    evals = json.loads((out / "metrics.json").read_text())["evals"]
    best = max(evals, key=lambda e: (e["accuracy"], -e["step"]))   # the first of the best kept
    assert scores["accuracy"] == pytest.approx(best["accuracy"])


def test_adalora_dpo_runs_and_resumes_to_the_same_end(tiny_model_dir, tmp_path, capsys):
    from conftest import run_until_first_checkpoint
    pairs = [{"prompt": f"question {i}", "chosen": "the answer is always llama", "rejected": f"maybe {i}"}
             for i in range(24)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    args = ["finetune", "dpo", "--train", str(data), "--dev", str(data), "--model", str(tiny_model_dir),
            "--dtype", "fp32", "--batch-size", "4", "--method", "adalora", "--init-rank", "4", "--target-rank", "2",
            "--max-steps", "12", "--eval-every", "3", "--lr", "1e-2", "--seed", "0"]
    main([*args, "--out", str(tmp_path / "whole")])
    whole = json.loads(capsys.readouterr().out)
    import sys
    step = run_until_first_checkpoint([sys.executable, "-m", "llamaforge", *args, "--out", str(tmp_path / "cut")],
                                      tmp_path / "cut" / "checkpoint")
    assert 0 < step < 12
    main(["finetune", "dpo", "--out", str(tmp_path / "cut"), "--resume"])
    resumed = json.loads(capsys.readouterr().out)
    assert resumed["loss"] == pytest.approx(whole["loss"], abs=1e-4)
    saved = json.loads((tmp_path / "cut" / "best" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == json.loads((tmp_path / "whole" / "best" / "adapter_config.json").read_text())[
        "rank_pattern"]
