"""`--device auto|cpu|cuda|cuda:N`: auto is the CPU on a machine without CUDA, and a CUDA device
that is not there is one clear error line from every command that takes the flag, before any
model loads."""
import subprocess
import sys

import pytest
import torch

from llamaforge.errors import LlamaforgeError
from llamaforge.model.device import resolve_device

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


def test_auto_and_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "mps"])
def test_unknown_devices_are_named(spec):
    with pytest.raises(LlamaforgeError, match=f"--device '{spec}'"):
        resolve_device(spec)


@no_cuda
@pytest.mark.parametrize("spec", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_one_clear_error(spec):
    with pytest.raises(LlamaforgeError, match=r"no CUDA device here .*use --device cpu or auto"):
        resolve_device(spec)


@no_cuda
@pytest.mark.parametrize("command", [
    ["generate", "--device", "cuda", "Hello"],
    ["chat", "--device", "cuda"],
    ["serve", "--device", "cuda", "--port", "1"],
    ["evaluate", "default", "--task", "perplexity", "--data", "README.md", "--device", "cuda"],
])
def test_every_command_says_so_in_one_line(command):
    r = subprocess.run([sys.executable, "-m", "llamaforge", *command], capture_output=True, text=True, timeout=120,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "--device cuda: no CUDA device here" in r.stderr


def test_generate_on_the_cpu(tiny_model_dir):
    r = subprocess.run([sys.executable, "-m", "llamaforge", "generate", "--model", str(tiny_model_dir), "--device", "cpu",
                        "--temperature", "0", "--max-new-tokens", "5", "--dtype", "fp32", "Hello"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
