"""Where a model runs (src/endless/device.py and the device-agnostic paths), checked on the CPU.

The CUDA comparisons themselves are in tests/test_cuda.py and run only where PyTorch sees a GPU;
here: the device choice and its errors, a "meta" device run of every path (a tensor left on
the host while the weights live elsewhere raises there, as it would on CUDA), the fused
attention that CUDA uses against the CPU products, and gradient checkpointing of the FAM
schedule."""

import random
import subprocess
import sys

import pytest
import torch

from endless.attention import gqa_mix, gqa_scores, sdpa_attention
from endless.device import resolve_device
from endless.errors import EndlessError
from endless.fam import FamPrompt, parallel_forward
from endless.models.tiny import tiny_model
from endless.policies.spec import parse_policy
from endless.stream import Stream
from endless.transformer import Transformer

NO_CUDA = not torch.cuda.is_available()


def test_auto_is_cpu_without_a_gpu_and_bad_names_are_one_line():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cpu" if NO_CUDA else "cuda")
    with pytest.raises(EndlessError, match="unknown device"):
        resolve_device("gpu0")
    with pytest.raises(EndlessError, match="unsupported device"):
        resolve_device("meta")


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_refused_in_python_and_on_the_command_line():
    with pytest.raises(EndlessError, match="no CUDA device"):
        resolve_device("cuda")
    for args in (["generate", "hi", "--device", "cuda"], ["train", "fam", "--out", "x", "--device", "cuda"]):
        p = subprocess.run([sys.executable, "-m", "endless.cli.main", *args], capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 2, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and "no CUDA device" in lines[0], p.stderr


def _on_meta():
    """A tiny model whose weights (and RoPE) live on the meta device: shapes propagate, data does
    not, and mixing a host tensor into a device computation raises."""
    model = Transformer(tiny_model("llama"))
    model.hf.to("meta")
    model.rope = model.rope.to("meta")
    return model


@pytest.mark.parametrize("spec", ["dense", "window:16", "sinks:4+12", "recompute:16", "bswa:8x1", "fam:8x1+4"])
def test_every_policy_keeps_its_work_on_the_model_device(spec):
    model = _on_meta()
    stream = Stream(model, spec, chunk=8)
    ids = torch.randint(0, 100, (1, 40))
    stream.feed(ids, logprobs=False)  # chunks, past every window and the sinks' steady state
    assert stream.last_logits.device.type == "meta"
    stream.feed(ids[:, :1], logprobs=False)  # the one-token path
    assert stream.next_token().device.type == "meta"


@pytest.mark.parametrize("fused", [False, True])
def test_the_parallel_fam_schedule_keeps_its_work_on_the_model_device(fused):
    model = _on_meta()
    prompt = FamPrompt.neutral(model, 4)
    logits, state = parallel_forward(model, torch.randint(0, 100, (2, 37)), parse_policy("fam:8x1+4"), prompt,
                                     return_state=True, fused=fused)
    assert logits.device.type == "meta" and state[0].device.type == "meta"


def test_fused_attention_equals_the_gqa_products():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, s, 5, 8, generator=g) for s in (6, 3, 3))  # 6 query heads over 3 KV heads
    bias = torch.zeros(5, 5).masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    want = gqa_mix(torch.softmax(gqa_scores(q, k) + bias, dim=-1), v)
    assert torch.allclose(sdpa_attention(q, k, v, bias), want, atol=1e-6)


@pytest.mark.parametrize("spec", ["fam:8x1+4", "bswa:8x2", "fam:8x0+2,firstres"])
def test_fused_parallel_schedule_equals_the_einsum_one(spec):
    model = Transformer(tiny_model("llama"))
    pol = parse_policy(spec)
    prompt = FamPrompt.neutral(model, pol.fam) if getattr(pol, "fam", 0) else None
    ids = torch.randint(0, 100, (2, 45), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = parallel_forward(model, ids, pol, prompt, fused=False)
        b = parallel_forward(model, ids, pol, prompt, fused=True)
    assert (a - b).abs().max() < 1e-4


def test_the_parallel_schedule_fuses_its_attention_by_default_and_the_variable_turns_it_off(monkeypatch):
    # the CPU too takes PyTorch's fused kernel (benchmarks/fam-train-step: the paper's B = 1,024 trains
    # 5.5x faster and in half the memory); ENDLESS_FUSED_ATTENTION=0 brings back the einsum reference
    model = Transformer(tiny_model("llama"))
    pol = parse_policy("fam:8x1+4")
    prompt = FamPrompt.neutral(model, 4)
    ids = torch.randint(0, 100, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fused = parallel_forward(model, ids, pol, prompt, fused=True)
        einsum = parallel_forward(model, ids, pol, prompt, fused=False)
        assert not torch.equal(fused, einsum)  # they round differently, so the asserts below tell them apart
        assert torch.equal(parallel_forward(model, ids, pol, prompt), fused)
        monkeypatch.setenv("ENDLESS_FUSED_ATTENTION", "0")
        assert torch.equal(parallel_forward(model, ids, pol, prompt), einsum)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    model = Transformer(tiny_model("llama"))
    pol = parse_policy("fam:8x1+4")
    prompt = FamPrompt.neutral(model, 4)
    ids = torch.randint(0, 100, (2, 30), generator=torch.Generator().manual_seed(2))
    grads = []
    for ckpt in (False, True):
        model.hf.zero_grad()
        prompt.zero_grad()
        loss = parallel_forward(model, ids, pol, prompt, checkpoint=ckpt).logsumexp(-1).mean()
        loss.backward()
        grads.append((loss.detach(), model.layers[0].self_attn.q_proj.weight.grad.clone(),
                      prompt.embeddings.grad.clone()))
    for x, y in zip(*grads, strict=True):
        assert torch.allclose(x, y, atol=1e-5)


def test_stream_device_argument_and_transformer_to():
    model = Transformer(tiny_model("llama"))
    assert model.to("cpu") is model and model.rope.device.type == "cpu"
    stream = Stream(model, "sinks:4+12", chunk=8, device="cpu")
    lp = stream.feed(torch.randint(0, 100, (1, 30)))
    assert lp.device.type == "cpu" and torch.isfinite(lp[0, 1:]).all()


def test_sampling_with_a_seed_draws_on_the_host():
    model = Transformer(tiny_model("llama"))
    tokens = []
    for _ in range(2):
        stream = Stream(model, "window:16", chunk=8)
        stream.feed(torch.arange(10))
        tokens.append(list(stream.generate(5, temperature=1.0, seed=3)))
    assert tokens[0] == tokens[1]


def test_curriculum_advances_by_budget_share_and_once_learned():
    from endless.train.curriculum import Stages
    from endless.train.fam import FamTrainConfig
    from endless.train.states import passed_state

    c = Stages((200, 400, 800), threshold=0.5, window=5)
    assert c.length == 200 and c.share == 1 / 3
    c.record(0, 3.0, spent=False)
    assert c.length == 200
    c.record(29, 3.0, spent=True)  # its share of the budget is spent: the second stage
    assert c.length == 400 and c.began == [{"step": 0, "length": 200}, {"step": 30, "length": 400}]
    for step in range(30, 35):  # learned before its share of the budget
        c.record(step, 0.1)
    assert c.length == 800 and c.share == 1.0
    with pytest.raises(EndlessError, match="--curriculum"):
        FamTrainConfig(min_len=100, max_len=800, curriculum=(400, 200))
    with pytest.raises(EndlessError, match="--minutes"):
        FamTrainConfig(minutes=0)
    carried = [torch.arange(3.0)[:, None, None].expand(3, 2, 4)]
    first = passed_state(carried, 5, False, random.Random(0))[0]
    assert first.shape == (5, 2, 4) and (first == 0).all()
    mixed = passed_state(carried, 6, True, random.Random(0))[0]
    assert mixed.shape == (6, 2, 4) and len(set(mixed[:, 0, 0].tolist())) > 1
