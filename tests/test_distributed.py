"""Training on many processes (torchrun, gloo, CPU): DDP and FSDP2 compute what one process
with gradient accumulation does, checkpoints reshard, a dying rank ends the job."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llamaforge.data.batching import share
from llamaforge.errors import LlamaforgeError
from llamaforge.train.checkpoint import read_meta
from llamaforge.train.distributed import choose_strategy

from conftest import hf_model_from_dir

CLI = [sys.executable, "-m", "llamaforge"]


def chat_file(path: Path, n: int = 48) -> Path:
    """Conversations of different lengths (so batches have uneven shares of tokens)."""
    rows = [{"messages": [{"role": "user", "content": "question " + " ".join(["llama"] * (1 + i % 7)) + f" {i}"},
                          {"role": "assistant", "content": "the answer is " + "alpaca " * (1 + i % 5)}]}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft_args(model_dir, data, out, *extra):
    return ["finetune", "sft", "--model", str(model_dir), "--train", str(data), "--out", str(out), "--dtype", "fp32",
            "--batch-size", "8", "--max-steps", "10", "--warmup", "0", "--samples", "0", "--eval-every", "10",
            "--lora-dropout", "0", *extra]


def run(args, env_extra=None, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    r = subprocess.run(CLI + args, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def train_losses(out: Path) -> list[float]:
    return [e["loss"] for e in json.loads((out / "metrics.json").read_text())["train"]]


def test_a_batch_is_cut_into_disjoint_shares_in_order():
    batch = list(range(11))
    parts = [share(batch, k, 4) for k in range(4)]
    assert [len(p) for p in parts] == [3, 3, 3, 2]
    assert sum(parts, []) == batch   # disjoint, complete, in order: what every world size cuts alike
    assert share([1], 1, 2) == []    # a short batch leaves a rank without a share (it computes 0)


def test_strategies():
    assert choose_strategy("auto", "lora") == "ddp" and choose_strategy("auto", "full") == "fsdp"
    assert choose_strategy("fsdp", "lora") == "fsdp"
    with pytest.raises(LlamaforgeError, match="distributed must be one of"):
        choose_strategy("zero3", "full")


def test_ddp_on_two_processes_equals_one_process_with_accumulation(tiny_model_dir, tmp_path):
    data = chat_file(tmp_path / "chat.jsonl")
    one, two = tmp_path / "one", tmp_path / "two"
    run(sft_args(tiny_model_dir, data, one, "--grad-accum", "2"))
    r = run(sft_args(tiny_model_dir, data, two, "--nproc", "2", "--distributed", "ddp"))
    assert json.loads(r.stdout.strip().splitlines()[-1])["loss"] > 0   # rank 0 alone prints the result
    assert len(r.stdout.strip().splitlines()) == 1
    a, b = train_losses(one), train_losses(two)
    assert len(a) == 1 and a == pytest.approx(b, abs=1e-5)
    wa, wb = (load_file(d / "best" / "adapter_model.safetensors") for d in (one, two))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=0)


def test_fsdp_full_finetuning_on_two_processes_saves_an_ordinary_model(tiny_model_dir, tmp_path):
    data = chat_file(tmp_path / "chat.jsonl")
    one, two = tmp_path / "one", tmp_path / "two"
    full = ["--method", "full", "--lr", "1e-3"]
    run(sft_args(tiny_model_dir, data, one, "--grad-accum", "2", *full))
    r = run(sft_args(tiny_model_dir, data, two, "--nproc", "2", "--distributed", "fsdp", *full))
    held, total = (int(x.replace(",", "")) for x in re.search(r"each holds ([\d,]+) of ([\d,]+) trainable", r.stderr).groups())
    assert held == pytest.approx(total / 2, rel=0.01)   # sharded: each rank holds half
    assert train_losses(one) == pytest.approx(train_losses(two), abs=1e-5)
    wa, wb = (load_file(d / "best" / "model.safetensors") for d in (one, two))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=0)
    # The best model is one HF directory (no shards), which transformers loads.
    assert not list((two / "best").glob("*.distcp"))
    hf = hf_model_from_dir(two / "best")
    ids = torch.tensor([[1, 2, 3, 4]])
    from llamaforge.formats.load import load
    ours, _ = load(two / "best", dtype="fp32")
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids, fp32_logits=True), atol=1e-4, rtol=1e-4)


def test_a_killed_rank_ends_the_job_and_one_process_resumes_its_checkpoint(tiny_model_dir, tmp_path):
    data = chat_file(tmp_path / "chat.jsonl", n=96)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    args = ["--method", "full", "--lr", "1e-3", "--max-steps", "24", "--save-every", "4", "--eval-every", "12"]
    run(sft_args(tiny_model_dir, data, whole, *args))

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(CLI + sft_args(tiny_model_dir, data, killed, *args, "--nproc", "2"),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)
    deadline = time.time() + 120
    while not (killed / "checkpoint" / "latest").exists() and time.time() < deadline and job.poll() is None:
        time.sleep(0.05)
    assert job.poll() is None, "the job ended before its first checkpoint"
    workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True,
                                               text=True).stdout.split()]
    assert len(workers) == 2
    killed_at = time.time()
    os.kill(workers[1], signal.SIGKILL)
    try:
        job.wait(timeout=60)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode != 0 and time.time() - killed_at < 60
    saved = read_meta(killed / "checkpoint")["state"]["step"]
    assert 0 < saved < 20   # (the last logged window, steps 21-24, then runs whole after the resume)

    run(["finetune", "sft", "--out", str(killed), "--resume", "--nproc", "1"])
    assert train_losses(killed)[-1] == pytest.approx(train_losses(whole)[-1], abs=1e-4)
    a, b = (json.loads((d / "metrics.json").read_text())["final"]["dev"]["loss"] for d in (whole, killed))
    assert a == pytest.approx(b, abs=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_training_on_cuda_without_cuda_is_one_clear_error(tiny_model_dir, tmp_path):
    data = chat_file(tmp_path / "chat.jsonl")
    r = subprocess.run(CLI + sft_args(tiny_model_dir, data, tmp_path / "run", "--device", "cuda"), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "--device cuda: no CUDA device here" in r.stderr
    assert not (tmp_path / "run").exists()


def test_the_memory_estimate_is_printed_and_a_run_that_cannot_fit_stops_before_training(tiny_model_dir, tmp_path,
                                                                                        monkeypatch, capsys):
    from llamaforge.cli import main
    from llamaforge.train import trainer
    data = chat_file(tmp_path / "chat.jsonl")
    main(sft_args(tiny_model_dir, data, tmp_path / "fits", "--max-steps", "1"))
    err = capsys.readouterr().err
    assert re.search(r"memory per process, estimated for 8 x 256 tokens", err) and "peak total" in err   # (its context)
    monkeypatch.setattr(trainer, "available_memory", lambda device: 2 ** 20)
    with pytest.raises(LlamaforgeError, match=r"training needs about .* per process on cpu, but 1 MB is available .*Try --gradient-checkpointing"):
        main(["--debug", *sft_args(tiny_model_dir, data, tmp_path / "too-big", "--max-steps", "1")])
    assert not (tmp_path / "too-big" / "checkpoint").exists()
