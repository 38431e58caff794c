"""The training memory estimate: its terms by trainer.fit's rules, FSDP and DDP, the advice when a
run cannot fit, and the whole against the peak memory of real training steps, measured in a
fresh process (tests/memory_probe.py)."""
import pytest
import torch

from llamaforge.errors import LlamaforgeError
from llamaforge.model.adapters import LoRAConfig, add_lora
from llamaforge.model.config import LlamaConfig
from llamaforge.model.llama import Llama, LlamaForClassification
from llamaforge.train.memory import available_memory, check_fits, estimate_training_memory

from memory_probe import measure

MEASURED = {
    # A 3.4M-parameter random model, fp32, whose step grows the process by ~750 MB.
    "random-fp32-full": {"model": "mini", "dtype": "fp32", "method": "full", "batch": 16, "seq_len": 256},
    "random-fp32-full-checkpointed": {"model": "mini", "dtype": "fp32", "method": "full", "batch": 8,
                                      "seq_len": 256, "checkpointing": True},
    "smollm2-bf16-lora": {"model": "default", "dtype": "bf16", "method": "lora", "batch": 8, "seq_len": 128},
    "smollm2-bf16-full": {"model": "default", "dtype": "bf16", "method": "full", "batch": 8, "seq_len": 128},
    "smollm2-bf16-qlora-int4": {"model": "default", "dtype": "bf16", "method": "lora", "quantize_base": "int4",
                                "batch": 8, "seq_len": 128},
}


@pytest.mark.parametrize("case", MEASURED)
def test_estimate_within_a_quarter_of_the_measured_peak(case):
    result = measure(MEASURED[case])
    measured, estimate = result["measured"], result["estimate"]["total"]
    print(f"\n{case}: estimated {estimate / 2**20:.0f} MB, measured {measured / 2**20:.0f} MB "
          f"(x{estimate / measured:.2f})\n{result['summary']}")
    assert abs(estimate - measured) <= 0.25 * measured


def meta_model(preset="smollm2-135m", dtype=torch.bfloat16, lora=False) -> Llama:
    with torch.device("meta"):   # shapes only: the estimate reads no weight
        model = Llama(LlamaConfig.from_name(preset)).to(dtype)
    if lora:
        add_lora(model, LoRAConfig(rank=8, targets=["q_proj", "v_proj"]))
    return model


def test_terms_follow_the_trainer():
    full = meta_model()
    n = full.num_parameters()
    est = estimate_training_memory(full, micro_batch_size=8, seq_len=128)
    # bf16 weights; fp32 master, gradient and two moments per trained parameter
    assert (est.weights, est.masters, est.gradients, est.optimizer) == (2 * n, 4 * n, 4 * n, 8 * n)
    lora = meta_model(lora=True)
    k = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    est_lora = estimate_training_memory(lora, micro_batch_size=8, seq_len=128)
    assert (est_lora.masters, est_lora.gradients, est_lora.optimizer) == (4 * k, 4 * k, 8 * k)
    fp32 = estimate_training_memory(meta_model(dtype=torch.float32), micro_batch_size=8, seq_len=128)
    assert fp32.masters == 0 and fp32.gradients == 4 * n   # an fp32 parameter is its own master
    assert est.total > est_lora.total
    # Activations peak before the gradients are made, so the total is less than the sum of terms.
    assert est.total < est.weights + est.masters + est.optimizer + est.gradients + est.activations + est.overhead
    bigger = estimate_training_memory(full, micro_batch_size=16, seq_len=128)
    assert bigger.activations == pytest.approx(2 * est.activations, rel=0.01)


def test_checkpointing_keeps_little_but_the_logits():
    model = meta_model()
    plain = estimate_training_memory(model, micro_batch_size=8, seq_len=128)
    ckpt = estimate_training_memory(model, micro_batch_size=8, seq_len=128, gradient_checkpointing=True)
    logits = 8 * 128 * model.config.vocab_size * 2 * 2   # on a CPU: bf16 logits and their gradient
    assert logits < ckpt.activations < logits * 1.2 < plain.activations
    # A classifier has no vocabulary logits.
    clf = estimate_training_memory(LlamaForClassification(model, 2), micro_batch_size=8, seq_len=128,
                                   gradient_checkpointing=True)
    assert clf.activations < ckpt.activations / 2


def test_attention_on_a_gpu_keeps_no_probabilities():
    """On a GPU, training attention is SDPA's: memory linear in the tokens, not in length squared."""
    model = meta_model()
    cpu = [estimate_training_memory(model, micro_batch_size=8 // k, seq_len=512 * k).activations for k in (1, 4)]
    gpu = [estimate_training_memory(model, micro_batch_size=8 // k, seq_len=512 * k, device="cuda").activations
           for k in (1, 4)]
    assert gpu[0] == gpu[1] < cpu[0] < cpu[1] / 2


def test_fsdp_shares_the_state_and_ddp_copies_gradients():
    model = meta_model()
    single = estimate_training_memory(model, micro_batch_size=4, seq_len=256)
    fsdp = estimate_training_memory(model, micro_batch_size=4, seq_len=256, strategy="fsdp", world_size=4)
    ddp = estimate_training_memory(model, micro_batch_size=4, seq_len=256, strategy="ddp", world_size=4)
    # FSDP: fp32 shards (their own masters) of 1/4 of everything, and bf16 copies of two blocks
    # and of the root (embeddings, final norm) gathered for the step.
    n = model.num_parameters()
    block = sum(p.numel() for p in model.layers[0].parameters())
    root = n - len(model.layers) * block
    assert fsdp.weights == 4 * n // 4 + 2 * (2 * block + root)
    assert (fsdp.masters, fsdp.optimizer, fsdp.gradients) == (0, single.optimizer // 4, single.gradients // 4)
    assert (ddp.weights, ddp.masters, ddp.optimizer) == (single.weights, single.masters, single.optimizer)
    assert ddp.gradients == single.gradients + single.weights   # + bf16 all-reduce buckets
    assert fsdp.activations == ddp.activations == single.activations   # per rank, per micro-batch
    assert "fsdp over 4 processes" in fsdp.format()
    with pytest.raises(LlamaforgeError, match="strategy must be"):
        estimate_training_memory(model, micro_batch_size=1, seq_len=8, strategy="zero3")


def test_a_run_that_cannot_fit_is_one_clear_error():
    est = estimate_training_memory(meta_model(), micro_batch_size=8, seq_len=512)
    check_fits(est, est.total, "cpu")     # fits exactly
    check_fits(est, None, "cpu")          # unknown: no opinion
    with pytest.raises(LlamaforgeError) as err:
        check_fits(est, est.total // 2, "cuda:0 (NVIDIA T4)")
    message = str(err.value)
    print("\n" + message + "\n" + est.format())
    for part in (f"{est.total / 2**30:.2f} GB per process on cuda:0 (NVIDIA T4)",
                 f"{est.total / 2 / 2**30:.2f} GB is available", "largest: activations",
                 "--gradient-checkpointing", "--grad-accum", "--max-length"):
        assert part in message
    assert len(est.format().splitlines()) == 7   # six terms and the total
    # Where the optimiser's state is the bulk, the advice is LoRA or FSDP.
    est = estimate_training_memory(meta_model("smollm2-1.7b"), micro_batch_size=1, seq_len=64)
    with pytest.raises(LlamaforgeError) as err:
        check_fits(est, 2**30, "cpu")
    assert "--method lora" in str(err.value) and "FSDP over more processes" in str(err.value)
    assert "--gradient-checkpointing" not in str(err.value)


def test_available_memory_on_the_cpu():
    free = available_memory("cpu")
    assert isinstance(free, int) and 0 < free < 2**50
