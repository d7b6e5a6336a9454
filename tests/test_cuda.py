"""The CUDA path against the CPU reference (run where PyTorch sees a GPU; skipped elsewhere).

float32 on both devices (TF32 off, PyTorch's default for matrix products): our forward on CUDA
equals transformers' forward on the CPU within 1e-3, every policy's log-probs agree across
devices, FAM's parallel (fused attention) and streaming forms agree on CUDA, a stream saved on
one device resumes on the other, and `train fam` takes real steps on CUDA whose checkpoint
loads on the CPU. `benchmarks/gpu/scripts/run.sh` runs this file first on a lent GPU."""

import pytest
import torch
from fam_helpers import tiny_folder

from endless.fam import FamPrompt, parallel_forward
from endless.fam.state import FamState
from endless.models.tiny import tiny_model
from endless.policies.spec import parse_policy
from endless.stream import Stream
from endless.transformer import Transformer

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

POLICIES = ["dense", "window:32", "sinks:4+28", "recompute:32", "bswa:16x1", "fam:16x1+4"]


def _ids(n: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_cuda_logits_equal_transformers_on_the_cpu(family):
    hf = tiny_model(family)
    ids = _ids(40)
    with torch.no_grad():
        want = hf(ids).logits
    stream = Stream(Transformer(tiny_model(family), device="cuda"), "dense", chunk=16)
    stream.feed(ids[:, :-1])
    got = stream.last_logits
    assert got.device.type == "cuda"
    assert (got.cpu() - want[:, -2]).abs().max() < 1e-3


@pytest.mark.parametrize("spec", POLICIES)
def test_every_policy_gives_the_same_logprobs_on_cuda_and_cpu(spec):
    ids = _ids(100, batch=2)
    out = []
    for device in ("cpu", "cuda"):
        stream = Stream(Transformer(tiny_model("llama"), device=device), spec, batch=2, chunk=16)
        lp = stream.feed(ids)
        for _ in range(3):  # the one-token path too
            lp2 = stream.feed(stream.next_token()[:, None])
        out.append((lp, lp2))
    for a, b in zip(*out, strict=True):
        assert torch.allclose(a.nan_to_num(), b.nan_to_num(), atol=1e-3)


def test_fam_parallel_and_streaming_agree_on_cuda():
    model = Transformer(tiny_model("llama"), device="cuda")
    pol = parse_policy("fam:16x1+4")
    prompt = FamPrompt.neutral(model, 4)
    ids = _ids(90, batch=2).cuda()
    with torch.no_grad():
        par = parallel_forward(model, ids, pol, prompt)  # fused attention on CUDA
        state = FamState(model, pol, batch=2, prompt=prompt)
        seq = state.forward(ids)
    assert (par - seq).abs().max() < 1e-3


@pytest.mark.parametrize("there,back", [("cuda", "cpu"), ("cpu", "cuda")])
@pytest.mark.parametrize("spec", ["sinks:4+28", "fam:16x1+4", "dense"])
def test_a_stream_saved_on_one_device_resumes_on_the_other(tmp_path, spec, there, back):
    ids = _ids(120)
    whole = Stream(Transformer(tiny_model("llama")), spec, chunk=16).feed(ids)
    first = Stream(Transformer(tiny_model("llama"), device=there), spec, chunk=16)
    first.feed(ids[:, :70])
    first.save(tmp_path / "s.st")
    resumed = Stream.load(tmp_path / "s.st", Transformer(tiny_model("llama")), device=back)
    assert resumed.model.device.type == back
    assert torch.allclose(resumed.feed(ids[:, 70:]), whole[:, 70:], atol=1e-3)


def test_train_fam_steps_on_cuda_and_the_checkpoint_loads_on_the_cpu(tmp_path):
    from endless.fam.checkpoint import load_fam
    from endless.train.fam import FamTrainConfig, train

    folder = tiny_folder(tmp_path / "model")
    cfg = FamTrainConfig(model=str(folder), policy="fam:32x1+4", steps=6, batch=2, lr=1e-2, prompt_lr=1e-2,
                         lora_rank=4, min_len=250, max_len=300, curriculum=(270, 300), grad_checkpoint=True,
                         device="cuda", log_every=2)
    res = train(cfg, out=tmp_path / "ckpt", progress=False)
    assert len(res.losses) == 6 and all(torch.isfinite(torch.tensor(res.losses)))
    assert res.stages[-1]["length"] == 300 and "cpu" not in res.device.lower()
    model, _, policy = load_fam(tmp_path / "ckpt", device="cpu")
    lp = Stream(model, policy, chunk=32).feed(_ids(80))
    assert torch.isfinite(lp[0, 1:]).all()


@pytest.mark.real
def test_smollm2_on_cuda_equals_the_cpu(real_model):
    hf, tok = real_model
    ids = tok("The quick brown fox jumps over the lazy dog. " * 20, return_tensors="pt").input_ids[:, :200]
    cpu = Stream(Transformer(hf), "sinks:4+124", chunk=64).feed(ids)
    try:
        gpu = Stream(Transformer(hf).to("cuda"), "sinks:4+124", chunk=64).feed(ids)
    finally:
        hf.to("cpu")  # the fixture is shared with the CPU tests
    assert torch.allclose(cpu.nan_to_num(), gpu.nan_to_num(), atol=1e-3)


def test_verify_recompute_and_attention_maps_on_cuda_equal_the_cpu():
    from endless.analysis.attention import attention_maps
    from endless.eval.ppl import recompute_nll
    from endless.verify import verify_policy

    ids = _ids(60)[0]
    cpu, gpu = Transformer(tiny_model("llama")), Transformer(tiny_model("llama"), device="cuda")
    for spec in ("sinks:4+28", "fam:16x1+4", "recompute:32"):
        assert verify_policy(gpu, spec, ids[None], chunk=16).ok
    assert torch.allclose(recompute_nll(cpu, ids, 32), recompute_nll(gpu, ids, 32), atol=1e-3, equal_nan=True)
    assert torch.allclose(attention_maps(cpu, ids), attention_maps(gpu, ids), atol=1e-4)


def test_tiny_fam_trains_on_cuda_with_every_recipe_option():
    from endless.train.tiny import TinyConfig, evaluate, train_policy

    cfg = TinyConfig(steps=8, batch=4, carry=32, carry_grad=True, carry_after=0, unexplored=0.5,
                     unexplored_from="noise", eval_lengths=(96,), eval_examples=4)
    run = train_policy("fam:8x1+4", cfg, progress=False, device="cuda")
    assert run.model.device.type == "cuda" and len(run.losses) == 8
    assert all(torch.isfinite(torch.tensor(run.losses)))
    assert len(evaluate(run, cfg, progress=False)) == 1


def test_pooled_batched_decode_on_cuda_equals_each_stream_alone():
    """``endless serve``'s batched step on the GPU: the ring states of several sizes in their
    pools (``endless.serve.pool``), FAM on its own, against each stream decoding alone."""
    from serve_helpers import decode_alone_and_batched

    from endless.serve.pool import PoolSet

    model = Transformer(tiny_model("llama", seed=3), device="cuda")
    specs = ["sinks:2+12", "sinks:4+10", "window:14", "sinks:1+6", "sinks:1+6", "fam:4x1+2,firstres"]
    lengths = [3, 17, 30, 5, 21, 12]

    def streams():
        out = []
        for i, (spec, n) in enumerate(zip(specs, lengths, strict=True)):
            s = Stream(model, spec, chunk=8)
            s.feed(_ids(n, seed=i), logprobs=False)
            out.append(s)
        return out

    alone, batched = streams(), streams()
    pool = PoolSet(model, rows=8)
    for _ in range(12):
        assert decode_alone_and_batched(alone, batched, pool) < 1e-4
    assert sorted(pool.pools) == [15, 22]
