"""FAM training, checkpoints and the multi-process launch (src/endless/train/, fam/checkpoint.py)."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from fam_helpers import tiny_folder

from endless.cli.main import main
from endless.data.passkey import collate
from endless.errors import EndlessError
from endless.fam import parallel_forward
from endless.fam.checkpoint import load_fam
from endless.models import load
from endless.stream import Stream
from endless.train.fam import FamTrainConfig, train
from endless.train.tiny import TinyConfig, train_policy


def mean(xs):
    return sum(xs) / len(xs)


@pytest.mark.parametrize("spec", ["fam:8x1+4", "bswa:8x2"])
def test_tiny_from_scratch_steps_reduce_the_loss(spec):
    cfg = TinyConfig(steps=30, batch=8, lr=3e-3, warmup=0, cosine=False, init_std=0.02)
    run = train_policy(spec, cfg, progress=False)
    assert mean(run.losses[:3]) > 4.0  # ~ln(128) at random init
    assert mean(run.losses[-5:]) < mean(run.losses[:3]) - 1.0  # it learnt at least that answers are digits


def test_carried_batch_starts_from_the_streaming_fam_after_its_prefix():
    """``carry`` trains from the FAM a stream has after the prefix that holds the key: the parallel
    schedule's final state equals the streaming state's after the same tokens, and the graded
    part holds no key."""
    import random

    from endless.data.passkey import KEY_MARK
    from endless.fam.state import FamState
    from endless.policies.spec import parse_policy
    from endless.train.tiny import build_model, carried_batch

    cfg = TinyConfig(batch=2, carry=40)
    policy = parse_policy("fam:8x1+4")
    model = build_model(policy, cfg)
    ids, targets, state = carried_batch(model, policy, model.fam_prompt, 30, cfg, random.Random(0))
    assert ids.shape == (2, 34) and (ids != KEY_MARK).all() and (targets[:, -5:] >= 0).any()
    rng = random.Random(0)  # rebuild the whole sequences from the same draws
    prefix = rng.randrange(1, 40 // 8 + 1) * 8
    from endless.data.passkey import collate, digit_example

    whole, _ = collate([digit_example(prefix + 30, rng.random() * (prefix - 5) / (prefix + 30 - 6), rng=rng,
                                      vocab=cfg.vocab, digits=4) for _ in range(2)])
    assert torch.equal(whole[:, prefix:], ids) and (whole[:, :prefix] == KEY_MARK).any(dim=1).all()
    stream = FamState(model, policy, prompt=model.fam_prompt, batch=2)
    with torch.no_grad():
        stream.forward(whole[:, :prefix])
    for layer, s in enumerate(state):
        assert s.shape == (2, 4, 64)
        assert torch.allclose(s, stream.fam[layer], atol=1e-4)
    # carry_grad: the same draws as one whole graded sequence, no carried state
    g_ids, g_targets, g_state = carried_batch(model, policy, model.fam_prompt, 30,
                                              TinyConfig(batch=2, carry=40, carry_grad=True), random.Random(0))
    assert g_state is None and torch.equal(g_ids, whole) and torch.equal(g_targets[:, prefix:], targets)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    """A few LoRA steps on PassKey text through the FAM schedule, checkpoint written."""
    out = tmp_path_factory.mktemp("ckpt") / "fam"
    cfg = FamTrainConfig(model=str(folder), policy="fam:32x1+4", steps=12, lr=1e-2, prompt_lr=1e-2, lora_rank=4,
                         min_len=250, max_len=270, log_every=4)
    return train(cfg, out=out, progress=False), out


def test_lora_steps_reduce_the_loss(trained):
    res, _ = trained
    assert len(res.losses) == 12 and all(torch.isfinite(torch.tensor(res.losses)))
    assert mean(res.losses[-3:]) < mean(res.losses[:3]) - 0.5


def test_checkpoint_round_trip_identical_logits(trained, folder):
    res, out = trained
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "fam.json", "prompt.safetensors"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    model, tok, policy = load_fam(out)
    assert policy.spec == "fam:32x1+4" and tok is not None
    ids = torch.randint(0, 257, (1, 100), generator=torch.Generator().manual_seed(0))
    trained_model = res.module.model
    with torch.no_grad():
        want = parallel_forward(trained_model, ids, policy, res.module.prompt)
        got = parallel_forward(model, ids, policy, model.fam_prompt)
    assert (want - got).abs().max().item() < 1e-4
    assert torch.equal(model.fam_prompt.embeddings, res.module.prompt.embeddings)
    # the streaming path picks the prompt up from the model
    lp = Stream(model, policy).feed(ids)[:, 1:]
    ref = torch.log_softmax(want, -1)[:, :-1].gather(2, ids[:, 1:, None])[..., 0]
    assert (lp - ref).abs().max().item() < 1e-4
    # the LoRA changed the weights, and the identity tells the checkpoint from its base model
    base = Stream(load(folder)[0], policy)
    assert model.identity != base.model.identity and model.identity.startswith(base.model.identity.split("+")[0][:6])


def test_init_trains_a_checkpoint_further(trained, folder, tmp_path):
    """--init starts from the checkpoint's adapter and prompt (its first loss, on the same first
    batch, is the trained model's, not a fresh one's) and refuses another policy."""
    res, out = trained
    cfg = FamTrainConfig(model=str(folder), policy="fam:32x1+4", steps=2, lr=1e-2, prompt_lr=1e-2, lora_rank=4,
                         min_len=250, max_len=270, init=str(out))
    again = train(cfg, out=tmp_path / "more", progress=False)
    assert again.losses[0] < res.losses[0] - 0.5
    assert load_fam(tmp_path / "more")[2].spec == "fam:32x1+4"
    with pytest.raises(EndlessError, match="trained as fam:32x1\\+4"):
        train(FamTrainConfig(model=str(folder), policy="fam:32x0+4", steps=1, init=str(out)), out=None, progress=False)


def test_bfloat16_copy_of_a_checkpoint_loads_with_the_adapter_rounded(trained, tmp_path):
    """copy_fam stores the LoRA weights in bfloat16 (the committed form): the copy verifies, holds
    the same prompt, and gives the logits of the source within the adapter's rounding."""
    from safetensors.torch import load_file

    from endless.fam.checkpoint import copy_fam, read_meta

    _, out = trained
    small = copy_fam(out, tmp_path / "small")
    weights = load_file(str(small / "adapter" / "adapter_model.safetensors"))
    assert weights and all(w.dtype == torch.bfloat16 for w in weights.values())
    assert read_meta(small)["policy"] == read_meta(out)["policy"]
    assert (small / "adapter" / "adapter_model.safetensors").stat().st_size < \
        0.6 * (out / "adapter" / "adapter_model.safetensors").stat().st_size
    ref, _, policy = load_fam(out)
    got, _, _ = load_fam(small)
    assert torch.equal(got.fam_prompt.embeddings, ref.fam_prompt.embeddings) and got.identity != ref.identity
    ids = torch.randint(0, 257, (1, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = parallel_forward(ref, ids, policy, ref.fam_prompt)
        b = parallel_forward(got, ids, policy, got.fam_prompt)
    assert 0 < (a - b).abs().max().item() < 0.05 * a.abs().max().item()


def test_float32_checkpoint_loads_in_bfloat16(trained):
    """The base is checked and the LoRA merged in the training dtype, then cast: a bfloat16 load
    gives the float32 model's weights rounded, not a refusal."""
    _, out = trained
    ref, _, policy = load_fam(out)
    half, _, _ = load_fam(out, dtype="bfloat16")
    assert half.dtype == torch.bfloat16
    for (name, a), (_, b) in zip(ref.hf.named_parameters(), half.hf.named_parameters(), strict=True):
        assert torch.equal(a.to(torch.bfloat16), b), name


def test_stream_saved_on_fam_weights_refuses_the_base_model(trained, folder, tmp_path):
    _, out = trained
    model, _, policy = load_fam(out)
    s = Stream(model, policy)
    s.feed(torch.arange(40) % 257)
    s.save(tmp_path / "s.safetensors")
    Stream.load(tmp_path / "s.safetensors", model)
    with pytest.raises(EndlessError, match="another model"):
        Stream.load(tmp_path / "s.safetensors", load(folder)[0])


def test_corrupt_checkpoint_is_a_clear_error(trained, tmp_path):
    _, out = trained
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    data = bytearray((bad / "prompt.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (bad / "prompt.safetensors").write_bytes(bytes(data))
    with pytest.raises(EndlessError, match="checksum mismatch in prompt.safetensors"):
        load_fam(bad)
    shutil.rmtree(bad)
    shutil.copytree(out, bad)
    (bad / "adapter" / "adapter_config.json").unlink()
    with pytest.raises(EndlessError, match="adapter/adapter_config.json is missing"):
        load_fam(bad)
    (bad / "fam.json").write_text("{not json")
    with pytest.raises(EndlessError, match="unreadable"):
        load_fam(bad)
    (bad / "fam.json").unlink()
    with pytest.raises(EndlessError, match="fam.json is missing"):
        load_fam(bad)
    with pytest.raises(EndlessError, match="no FAM checkpoint"):
        load_fam(tmp_path / "nowhere")


def test_checkpoint_on_another_base_model_is_refused(trained, tmp_path):
    _, out = trained
    other = tiny_folder(tmp_path / "other", seed=1)
    with pytest.raises(EndlessError, match="another base model"):
        load_fam(out, base_model=str(other))


def test_cli_fam_tiny_json(tmp_path):
    path = tmp_path / "tiny.json"
    assert main(["train", "fam-tiny", "--steps", "3", "--batch", "4", "--policies", "fam:8x0+4;bswa:8x1",
                 "--eval-lengths", "24,40", "--eval-examples", "3", "--diagnose", "160", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert {(r["policy"], r["length"]) for r in data["results"]} == {(p, n) for p in ("fam:8x0+4", "bswa:8x1") for n in (24, 40)}
    assert all(len(r["loss"]) == 3 for r in data["runs"])
    fam, bswa = data["runs"]
    assert fam["memory"]["length"] == 160 and fam["memory"]["short"] == 96 and len(fam["memory"]["layers"]) == 2
    assert "memory" not in bswa  # no state to diagnose
    assert main(["train", "fam-tiny", "--steps", "3", "--diagnose", "100"]) == 2  # shorter than training + 3 blocks


def test_two_processes_with_torchrun(folder, tmp_path):
    """`endless train fam` under torchrun with 2 CPU processes: both ranks train (DDP over gloo),
    rank 0 alone writes the checkpoint."""
    out = tmp_path / "runs" / "fam"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "endless.cli.main", "-v", "train", "fam", "--model", str(folder), "--policy", "fam:32x0+2",
           "--steps", "2", "--min-len", "250", "--max-len", "260", "--lora-rank", "2", "--out", str(out),
           "--eval-examples", "1", "--json", str(tmp_path / "runs" / "train.json"),
           "--val-every", "1", "--val-examples", "3", "--val-len", "260", "--keep-best"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "rank 0 of 2: 2 steps" in p.stderr and "rank 1 of 2: 2 steps" in p.stderr
    assert p.stderr.count("wrote the checkpoint") == 1 and "rank 0 wrote the checkpoint" in p.stderr
    assert sorted(x.name for x in (tmp_path / "runs").iterdir()) == ["fam", "train.json"]
    data = json.loads((tmp_path / "runs" / "train.json").read_text())
    assert data["processes"] == 2 and len(data["loss"]) == 2 and data["results"][0]["policy"] == "fam:32x0+2"
    assert data["results"][0]["loss"] > 0  # the answer loss of the evaluation
    assert load_fam(out)[2].spec == "fam:32x0+2"
    # validation split 2 + 1 over the ranks, reduced: both ranks keep the same step
    assert [v["step"] for v in data["validation"]] == [0, 1, 2]
    assert data["best_step"] == min(data["validation"], key=lambda v: v["loss"])["step"]
    assert p.stderr.count(f"kept the state of step {data['best_step']}") == 2


def test_key_depth_fixes_where_the_key_sits_and_keeps_the_other_draws():
    import random

    from endless.data.passkey import KEY_MARK
    from endless.policies.spec import parse_policy
    from endless.train.tiny import build_model, carried_batch

    assert TinyConfig(key_depth=0.0).key_depth == 0.0
    with pytest.raises(EndlessError):
        TinyConfig(key_depth=1.5)
    # with --key-depth 0 a carried batch's key opens every sequence; the filler is the same draw
    policy = parse_policy("fam:8x1+4")
    model = build_model(policy, TinyConfig(batch=3, carry=40))
    fixed, _, _ = carried_batch(model, policy, model.fam_prompt, 30, TinyConfig(batch=3, carry=40, carry_grad=True,
                                                                                key_depth=0.0), random.Random(0))
    free, _, _ = carried_batch(model, policy, model.fam_prompt, 30, TinyConfig(batch=3, carry=40, carry_grad=True),
                               random.Random(0))
    assert (fixed[:, 0] == KEY_MARK).all() and fixed.shape == free.shape
    assert not (free[:, 0] == KEY_MARK).all()
    assert torch.equal(torch.sort(fixed[:, :-5], dim=1).values, torch.sort(free[:, :-5], dim=1).values)


def test_tiny_model_and_data_options_reach_the_run(tmp_path):
    """--vocab, --min-len/--max-len, --init-std and --out-std set the tiny run (results 7.2's
    variants); out of range is one line and exit code 2."""
    from endless.policies.spec import parse_policy
    from endless.train.tiny import build_model

    model = build_model(parse_policy("fam:8x1+4"), TinyConfig(vocab=32, out_std=0.0, init_std=0.5))
    assert model.hf.config.vocab_size == 32
    assert all(float(layer.self_attn.o_proj.weight.detach().abs().max()) == 0 for layer in model.hf.model.layers)
    assert 0.4 < float(model.hf.model.layers[0].mlp.up_proj.weight.detach().std()) < 0.6
    path = tmp_path / "t.json"
    assert main(["train", "fam-tiny", "--steps", "2", "--batch", "2", "--policies", "fam:8x1+4", "--vocab", "20",
                 "--min-len", "12", "--max-len", "20", "--eval-lengths", "24", "--eval-examples", "2",
                 "--json", str(path)]) == 0
    cfg = json.loads(path.read_text())["config"]
    assert (cfg["vocab"], cfg["min_len"], cfg["max_len"]) == (20, 12, 20)
    for bad in (["--vocab", "13"], ["--min-len", "9"], ["--min-len", "30", "--max-len", "20"], ["--init-std", "0"]):
        assert main(["train", "fam-tiny", "--steps", "1", *bad]) == 2


def test_diverging_tiny_training_stops_with_one_clear_line():
    """A loss that is no longer finite ends the run at that step with an EndlessError (the CLI's
    one line and exit code 2), instead of training on NaN weights to the end."""
    from endless.train.tiny import train_policy

    with pytest.raises(EndlessError, match="not finite at step"):
        train_policy("fam:8x1+4", TinyConfig(steps=50, batch=2, lr=1e30, warmup=1), progress=False)


def test_diverging_lora_training_stops_with_one_clear_line(folder, tmp_path):
    cfg = FamTrainConfig(model=str(folder), policy="fam:32x1+4", steps=30, lr=1e30, prompt_lr=1e30, lora_rank=2,
                         min_len=250, max_len=260)
    with pytest.raises(EndlessError, match="not finite at step"):
        train(cfg, out=tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()  # nothing half-written


def test_tiny_save_load_and_init(tmp_path):
    """--save writes a model that --load evaluates to the same accuracies and the same logits,
    and --init trains further from (its first loss is the saved model's, not a fresh one's);
    a damaged folder or contradicting flags are one line and exit code 2."""
    from endless.policies.spec import parse_policy
    from endless.train.tiny_checkpoint import load_tiny

    common = ["--eval-lengths", "24,48", "--eval-examples", "4"]
    first, again = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["train", "fam-tiny", "--steps", "20", "--batch", "4", "--vocab", "20", "--policies", "fam:8x1+4",
                 "--save", str(tmp_path / "m"), *common, "--json", str(first)]) == 0
    folder = tmp_path / "m" / "fam-8x1+4"
    assert main(["train", "fam-tiny", "--load", str(folder), *common, "--json", str(again)]) == 0
    a, b = json.loads(first.read_text()), json.loads(again.read_text())
    assert a["results"] == b["results"] and b["config"]["vocab"] == 20
    other = tmp_path / "c.json"  # --seed draws another test set for the loaded model
    assert main(["train", "fam-tiny", "--load", str(folder), *common, "--seed", "5", "--json", str(other)]) == 0
    assert (b["config"]["seed"], json.loads(other.read_text())["config"]["seed"]) == (0, 5)
    run, cfg = load_tiny(folder)
    assert (run.policy, cfg.steps, cfg.vocab, len(run.losses)) == ("fam:8x1+4", 20, 20, 20)
    assert not run.model.hf.training
    ids = torch.randint(0, 20, (2, 40))
    policy = parse_policy(run.policy)
    again_run, _ = load_tiny(folder)
    torch.testing.assert_close(parallel_forward(run.model, ids, policy, run.model.fam_prompt),
                               parallel_forward(again_run.model, ids, policy, again_run.model.fam_prompt), rtol=0, atol=0)
    fresh = tmp_path / "fresh.json"
    cont = tmp_path / "cont.json"
    assert main(["train", "fam-tiny", "--steps", "1", "--batch", "4", "--vocab", "20", "--policies", "fam:8x1+4",
                 *common, "--json", str(fresh)]) == 0
    assert main(["train", "fam-tiny", "--init", str(folder), "--steps", "1", "--batch", "4", *common,
                 "--json", str(cont)]) == 0
    start_loss = json.loads(cont.read_text())["runs"][0]["loss"][0]
    assert start_loss < json.loads(fresh.read_text())["runs"][0]["loss"][0] - 0.3  # trained weights, not new ones
    for bad in (["--load", str(folder), "--policies", "bswa:8x1"], ["--load", str(folder), "--init", str(folder)],
                ["--load", str(tmp_path / "none")], ["--load", str(folder), "--save", str(tmp_path / "x")]):
        assert main(["train", "fam-tiny", *bad]) == 2
    (folder / "model.safetensors").write_bytes(b"damaged")
    assert main(["train", "fam-tiny", "--load", str(folder)]) == 2


def _samplers(folder, lengths: tuple[int, int], **change):
    """Two training samplers of one seed: the default recipe, and the same with ``change``."""
    from endless.train.fam import Sampler

    tok = load(str(folder))[1]
    base = FamTrainConfig(model=str(folder), min_len=lengths[0], max_len=lengths[1], batch=2)
    return Sampler(base, tok, 0), Sampler(FamTrainConfig(**{**base.__dict__, **change}), tok, 0)


def test_max_depth_keeps_the_key_in_the_early_part_and_the_other_draws(folder):
    free, early = _samplers(folder, (200, 260), max_depth=0.25)
    for _ in range(20):
        a, b = free.batch(), early.batch()
        for x, y in zip(a, b, strict=True):
            assert len(x.prompt) == len(y.prompt) and x.key == y.key  # the same lengths and keys
            assert y.depth == pytest.approx(x.depth * 0.25) and y.depth <= 0.25
    with pytest.raises(EndlessError):
        FamTrainConfig(max_depth=1.5)


def test_queries_grade_more_answers_with_the_same_draws(folder):
    """--queries 2: the same lengths, keys and depths as without, one answered question more
    inside each prompt, whose answer collate grades."""
    one, two = _samplers(folder, (400, 460), queries=2)
    for _ in range(5):
        a, b = one.batch(), two.batch()
        for x, y in zip(a, b, strict=True):
            assert (len(x.prompt), x.key, x.depth, x.spans) == (len(y.prompt), y.key, y.depth, ())
            (lo, hi), = y.spans
            assert y.prompt[lo:hi] == y.answer
        graded = (collate(b)[1] != -100).sum().item()
        assert graded == 2 * sum(len(e.answer) for e in b)


def test_align_ends_prompts_on_block_boundaries_with_the_same_keys(folder):
    """--align 1: every prompt is a whole number of blocks (64 here) inside [min_len, max_len], so
    the answer opens a new block; keys and depths are drawn as without it. --align 0.5: some are."""
    free, aligned = _samplers(folder, (200, 460), align=1.0)
    for _ in range(20):
        a, b = free.batch(), aligned.batch()
        for x, y in zip(a, b, strict=True):
            assert len(y.prompt) % 64 == 0 and 200 <= len(y.prompt) <= 460
            assert (x.key, x.depth) == (y.key, y.depth)
            assert abs(len(x.prompt) - len(y.prompt)) < 64
    half = _samplers(folder, (200, 460), align=0.5)[1]
    ends = [len(half.batch()[0].prompt) % 64 == 0 for _ in range(60)]
    assert 10 < sum(ends) < 50
    # no whole number of blocks fits: the drawn length stays
    plain, narrow = _samplers(folder, (200, 250), align=1.0)
    assert all(len(plain.batch()[0].prompt) == len(narrow.batch()[0].prompt) for _ in range(5))
    with pytest.raises(EndlessError):
        FamTrainConfig(align=1.5)


def test_lora_wrap_and_adapter_load_raise_no_dependency_deprecation(trained, folder):
    import warnings

    from endless.train.fam import build

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        hf, tok = load(str(folder))
        build(FamTrainConfig(model=str(folder), policy="fam:32x1+4", lora_rank=2), hf, tok)
        load_fam(trained[1])
    assert not [w for w in seen if "is_gradient_checkpointing" in str(w.message)]


def test_prompt_file_missing_or_of_another_shape_is_one_clear_error(tmp_path):
    from endless.fam import FamPrompt
    from endless.fam.checkpoint import load_prompt, save_prompt
    from endless.policies.spec import parse_policy

    policy = parse_policy("fam:8x1+4")
    with pytest.raises(EndlessError, match="incomplete"):
        load_prompt(tmp_path, policy, 64)
    save_prompt(tmp_path, FamPrompt(torch.randn(4, 64)))
    assert load_prompt(tmp_path, policy, 64).embeddings.shape == (4, 64)
    with pytest.raises(EndlessError, match=r"needs \(4, 32\)"):
        load_prompt(tmp_path, policy, 32)  # the rows of another model's width
    with pytest.raises(EndlessError, match=r"needs \(2, 64\)"):
        load_prompt(tmp_path, parse_policy("fam:8x1+2"), 64)
    assert load_prompt(tmp_path, parse_policy("bswa:8x1"), 64) is None


@pytest.mark.parametrize("bad, flag", [
    ({"grad_cap": 12}, "--grad-cap"), ({"grad_cap": -8}, "--grad-cap"),
    ({"curriculum": (64, 32)}, "--curriculum"), ({"curriculum": (4, 64)}, "--curriculum"),
    ({"curriculum": (64,), "carry": 64}, "--curriculum"), ({"curriculum_loss": 0.0}, "--curriculum-loss"),
    ({"unexplored": 1.5}, "--unexplored"), ({"unexplored_after": -1}, "--unexplored-after"),
    ({"unexplored_from": "zeros"}, "--unexplored-from"),
])
def test_recipe_options_refuse_bad_values_naming_the_flag(bad, flag):
    with pytest.raises(EndlessError, match=flag):
        TinyConfig(**bad)
    cfg = TinyConfig(grad_cap=16, curriculum=(32, 64), curriculum_loss=0.1, unexplored=0.5, unexplored_from="noise")
    assert (cfg.grad_cap, cfg.curriculum, cfg.longest_hold, cfg.unexplored_from) == (16, (32, 64), 64, "noise")


def test_grad_cap_reads_the_start_of_a_long_prefix_without_gradient():
    """--grad-cap 16: a graded prefix of more than 16 tokens is cut; its start runs without gradient
    and only the last 16 prefix tokens plus the rest are returned, with the state after the start."""
    import random

    from endless.policies.spec import parse_policy
    from endless.train.tiny import build_model, carried_batch

    policy = parse_policy("fam:8x1+4")
    cfg = TinyConfig(batch=2, carry=64, carry_grad=True, grad_cap=16)
    model = build_model(policy, cfg)
    for seed in range(6):
        prefix = random.Random(seed).randrange(1, 64 // 8 + 1) * 8  # carried_batch's first draw
        ids, targets, state = carried_batch(model, policy, model.fam_prompt, 30, cfg, random.Random(seed))
        assert ids.shape == targets.shape == (2, min(prefix, 16) + 34)  # + the 4 answer digits
        assert (state is None) == (prefix <= 16)
        if state is not None:
            assert len(state) == 2 and state[0].shape == (2, 4, 64) and not state[0].requires_grad
    ids, _, _ = carried_batch(model, policy, model.fam_prompt, 30, cfg, random.Random(0), hold=8)
    assert ids.shape == (2, 42)  # a curriculum stage's hold replaces --carry


def test_curriculum_moves_on_once_the_stage_is_learnt():
    from endless.train.curriculum import Stages

    c = Stages((16, 32, 64), threshold=0.1, window=3)
    assert c.length == 16
    for step, loss in enumerate([1.0, 0.05, 0.05]):  # mean over the window 0.37: stays
        c.record(step, loss)
    assert c.length == 16
    c.record(3, 0.05)  # the last three: 0.05
    assert c.length == 32 and c.began == [{"step": 0, "length": 16}, {"step": 4, "length": 32}]
    for step in range(4, 7):
        c.record(step, 0.01)
    for step in range(7, 20):
        c.record(step, 0.01)
    assert c.length == 64 and len(c.began) == 3  # the last stage stays
    assert Stages((40,)).length == 40 and Stages(()).length == 0


def test_unexplored_rows_start_from_explored_states_and_fresh_rows_as_usual():
    """A batch that mixes rows: those marked fresh give exactly the logits of a stream from the
    learned prompt, the others those of a stream continued from their state (a permuted final FAM
    of the last batch, or noise with its statistics)."""
    import random

    from endless.fam import initial_fam
    from endless.policies.spec import parse_policy
    from endless.train.states import unexplored_start
    from endless.train.tiny import build_model

    policy = parse_policy("fam:8x1+4")
    cfg = TinyConfig(batch=6, unexplored=0.5)
    model = build_model(policy, cfg)
    prompt = model.fam_prompt
    ids = torch.randint(12, 128, (6, 21))
    with torch.no_grad():
        _, last = parallel_forward(model, torch.randint(12, 128, (6, 30)), policy, prompt, return_state=True)
        init, fresh = unexplored_start(model, prompt, last, 0.5, "batch", random.Random(1),
                                       torch.Generator().manual_seed(0))
        assert fresh.any() and (~fresh).any() and len(init) == 2 and init[0].shape == (6, 4, 64)
        start = initial_fam(model, prompt)
        for s, s0, fin in zip(init, start, last, strict=True):
            assert torch.equal(s[fresh], s0[None].expand(int(fresh.sum()), -1, -1))
            assert all(any(torch.equal(row, x) for x in fin) for row in s[~fresh])  # another sequence's final FAM
        mixed = parallel_forward(model, ids, policy, prompt, init_state=init, fresh=fresh)
        plain = parallel_forward(model, ids, policy, prompt)
        cont = parallel_forward(model, ids, policy, prompt, init_state=init)
        assert torch.allclose(mixed[fresh], plain[fresh], atol=1e-5)
        assert torch.allclose(mixed[~fresh], cont[~fresh], atol=1e-5)
        assert not torch.allclose(mixed[~fresh], plain[~fresh], atol=1e-3)
        noise, _ = unexplored_start(model, prompt, last, 1.0, "noise", random.Random(1), torch.Generator().manual_seed(0))
        assert all(n.shape == fin.shape and not any(torch.equal(n[0], x) for x in fin) for n, fin in zip(noise, last, strict=True))
        assert unexplored_start(model, prompt, last, 0.0, "batch", random.Random(1), torch.Generator()) == (None, None)
        one, _ = unexplored_start(model, prompt, [s[:1] for s in last], 1.0, "noise", random.Random(1),
                                  torch.Generator().manual_seed(0))  # one sequence: its rows' spread
        assert all(n.shape == (1, 4, 64) and torch.isfinite(n).all() for n in one)


def test_graded_cut_keeps_at_most_the_cap_in_whole_blocks():
    from endless.train.states import graded_cut

    assert [graded_cut(n, 128, 32) for n in (100, 128, 129, 160, 161, 1000)] == [0, 0, 32, 32, 64, 896]
    assert graded_cut(1000, 0, 32) == 0  # no cap


def test_lora_recipe_options_cut_long_sequences_and_start_from_explored_states(folder, tmp_path, monkeypatch):
    """train fam --grad-cap: a sequence longer than the cap runs its start (whole blocks) without
    gradient through ``FamModule.hold``, whose FAM equals the stream's after the same tokens, and
    the graded rest goes on from it at its stream positions; --rsp-after and --unexplored (noise)
    train too, and every option reaches the checkpoint's record."""
    from endless.fam.state import FamState
    from endless.train.fam import FamModule

    held = []
    real_hold = FamModule.hold

    def spy(self, ids, offset=0, init_state=None, fresh=None):
        held.append((ids.shape[1], offset, init_state is not None))
        return real_hold(self, ids, offset, init_state, fresh)

    monkeypatch.setattr(FamModule, "hold", spy)
    cfg = FamTrainConfig(model=str(folder), policy="fam:32x1+4", steps=4, lr=1e-2, prompt_lr=1e-2, lora_rank=4,
                         min_len=250, max_len=270, grad_cap=128, rsp=0.5, rsp_after=2, unexplored=1.0,
                         unexplored_after=1, unexplored_from="noise", log_every=2)
    res = train(cfg, out=tmp_path / "ck", progress=False)
    assert len(res.losses) == 4 and all(torch.isfinite(torch.tensor(res.losses)))
    assert len(held) == 4 and all(n in (128, 160) and offset == 0 for n, offset, _ in held)  # 250-270 tokens, cap 128
    assert [from_state for _, _, from_state in held] == [False, True, True, True]  # step 0 from the prompt
    record = json.loads((tmp_path / "ck" / "fam.json").read_text())["train"]
    assert (record["grad_cap"], record["rsp_after"], record["unexplored"], record["unexplored_from"]) == (128, 2, 1.0, "noise")
    # the held FAM is the stream's after the same tokens
    module = res.module
    ids = torch.randint(0, 257, (1, 160), generator=torch.Generator().manual_seed(3))
    stream = FamState(module.model, module.policy, prompt=module.prompt, batch=1)
    with torch.no_grad():
        stream.forward(ids)
        for got, want in zip(real_hold(module, ids), stream.fam, strict=True):
            assert torch.allclose(got, want, atol=1e-4)
    for bad, flag in (({"grad_cap": 100}, "--grad-cap"), ({"unexplored_from": "zeros"}, "--unexplored-from"),
                      ({"unexplored": 2.0}, "--unexplored"), ({"rsp_after": -1}, "--rsp-after")):
        with pytest.raises(EndlessError, match=flag):
            FamTrainConfig(policy="fam:32x1+4", **bad)


def test_recipe_flags_reach_the_run_and_its_json(tmp_path):
    """--curriculum, --grad-cap and --unexplored train (a few steps) and are recorded; a bad value
    is one line and exit code 2."""
    path = tmp_path / "r.json"
    assert main(["train", "fam-tiny", "--steps", "4", "--batch", "2", "--policies", "fam:8x1+4", "--carry-grad",
                 "--curriculum", "16,32", "--curriculum-loss", "50", "--carry-p", "1", "--grad-cap", "16",
                 "--unexplored", "1", "--unexplored-from", "noise", "--eval-lengths", "24", "--eval-examples", "2",
                 "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    cfg = data["config"]
    assert (cfg["curriculum"], cfg["grad_cap"], cfg["unexplored"], cfg["unexplored_from"]) == ([16, 32], 16, 1.0, "noise")
    assert data["runs"][0]["curriculum"] == [{"step": 0, "length": 16}]  # 4 steps: less than the 50-step window
    for bad in (["--unexplored-from", "zeros"], ["--curriculum", "16,8"], ["--grad-cap", "7", "--carry-grad"]):
        assert main(["train", "fam-tiny", "--steps", "1", *bad]) == 2


def test_tiny_minutes_budget_stops_training_and_drives_the_cosine():
    """``--minutes``: validated; the decay follows the clock when it ends first; a run stopped by
    the clock keeps the steps it made."""
    from endless.train.tiny import lr_factor

    with pytest.raises(EndlessError, match="--minutes"):
        TinyConfig(minutes=0)
    cfg = TinyConfig(steps=1000, warmup=0, minutes=1.0)
    assert lr_factor(10, cfg, elapsed=0.0) == pytest.approx(lr_factor(10, TinyConfig(steps=1000, warmup=0)))
    assert lr_factor(10, cfg, elapsed=30.0) == pytest.approx(0.5, abs=0.02)  # half the clock: half the cosine
    assert lr_factor(10, cfg, elapsed=90.0) == pytest.approx(0.0)
    run = train_policy("fam:8x1+4", TinyConfig(steps=10_000, batch=2, minutes=1e-4, warmup=1), progress=False)
    assert 1 <= len(run.losses) < 10_000


def test_schedule_warmup_cosine_floor_and_clock():
    """The shared schedule: linear warm-up, constant or cosine to ``floor``, the clock when it ends first."""
    from endless.train.schedule import lr_factor

    assert [lr_factor(s, steps=10, warmup=4, cosine=False) for s in (0, 1, 3, 4, 9, 50)] == [0.25, 0.5, 1.0, 1.0, 1.0, 1.0]
    assert lr_factor(4, steps=10, warmup=4) == 1.0 and lr_factor(7, steps=10, warmup=4) == pytest.approx(0.5)
    assert lr_factor(10, steps=10, warmup=4) == pytest.approx(0.0) and lr_factor(99, steps=10) == pytest.approx(0.0)
    assert lr_factor(5, steps=10, floor=0.1) == pytest.approx(0.55) and lr_factor(10, steps=10, floor=0.1) == pytest.approx(0.1)
    assert lr_factor(1, steps=100, minutes=1.0, elapsed=60.0) == pytest.approx(0.0)  # the clock ended first


def test_train_fam_warmup_and_cosine_set_both_rates_each_step(folder, monkeypatch):
    """``warmup``/``cosine`` scale the LoRA and prompt rates together at every optimizer step; the
    default keeps both constant (the paper's), and a negative --warmup is one line and exit code 2."""
    seen = []
    real_step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        seen.append([g["lr"] for g in self.param_groups])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    base = dict(model=str(folder), policy="fam:32x1+4", steps=6, lr=1e-2, prompt_lr=4e-2, lora_rank=2, min_len=250, max_len=260)
    train(FamTrainConfig(**base, warmup=2, cosine=True), out=None, progress=False)
    factors = [0.5, 1.0, 1.0, 0.5 + 0.5 * math.cos(math.pi / 4), 0.5, 0.5 - 0.5 * math.cos(math.pi / 4)]
    assert [lr for pair in seen for lr in pair] == pytest.approx([lr for f in factors for lr in (1e-2 * f, 4e-2 * f)])
    seen.clear()
    train(FamTrainConfig(**{**base, "steps": 2}), out=None, progress=False)
    assert seen == [[1e-2, 4e-2]] * 2
    assert main(["train", "fam", "--out", "x", "--warmup", "-1"]) == 2


def test_save_every_writes_checkpoints_along_the_run(folder, tmp_path):
    """--save-every N: a loadable checkpoint at CHECKPOINT-stepN recording its steps; the last one
    equals the final checkpoint."""
    from safetensors.torch import load_file

    cfg = FamTrainConfig(model=str(folder), policy="fam:32x1+4", steps=4, lr=1e-2, prompt_lr=1e-2, lora_rank=2,
                         min_len=250, max_len=260, save_every=2)
    train(cfg, out=tmp_path / "ck", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "ck-step2", "ck-step4"]
    assert [json.loads((tmp_path / f"ck-step{n}" / "fam.json").read_text())["train"]["steps_done"] for n in (2, 4)] == [2, 4]
    assert load_fam(tmp_path / "ck-step2")[2].spec == "fam:32x1+4"
    final, last = (load_file(str(tmp_path / name / "prompt.safetensors")) for name in ("ck", "ck-step4"))
    assert all(torch.equal(final[k], last[k]) for k in final)
    assert main(["train", "fam", "--out", "x", "--save-every", "-1"]) == 2


def test_validation_keys_lie_outside_the_answer_window(folder):
    """Every validation key sentence ends before the first token the answer's first prediction
    attends to (its block and the M before it), depths ascend, keys come from their own seed; a
    length with no room for such a key is one clear error."""
    from endless.data.passkey import KEY_SENTENCE, PasskeyFormat
    from endless.policies.spec import parse_policy
    from endless.train.validation import validation_examples

    _, tok = load(str(folder))
    fmt = PasskeyFormat(tok)
    policy = parse_policy("fam:32x1+4")
    examples = validation_examples(fmt, policy, 300, 6, 5)
    assert len(examples) == 6 and len({e.key for e in examples}) == 6
    assert [e.depth for e in examples] == sorted(e.depth for e in examples)
    seen_from = (299 // 32 - 1) * 32
    for e in examples:
        sentence = tok(KEY_SENTENCE.format(key=e.key), add_special_tokens=False).input_ids
        starts = [i for i in range(len(e.prompt)) if e.prompt[i:i + len(sentence)] == sentence]
        assert len(e.prompt) == 300 and len(starts) == 1 and starts[0] + len(sentence) <= seen_from
    assert [e.key for e in validation_examples(fmt, policy, 300, 6, 5)] == [e.key for e in examples]
    with pytest.raises(EndlessError, match="--val-len 300 leaves no room"):
        validation_examples(fmt, parse_policy("fam:128x1+4"), 300, 2, 5)
    with pytest.raises(EndlessError, match="--val-len must be at least"):
        validation_examples(fmt, policy, 100, 2, 5)


def test_validation_curve_is_the_answer_loss_and_keep_best_writes_the_lowest(folder, tmp_path, monkeypatch):
    """--val-every: the recorded loss is the mean answer loss of the validation examples; with
    --keep-best the checkpoint and the returned module hold the state of the lowest loss, not the last."""
    from endless.data.passkey import PasskeyFormat
    from endless.eval.passkey import passkey_answer_loss
    from endless.train import validation

    base = dict(model=str(folder), policy="fam:32x1+4", lr=1e-2, prompt_lr=1e-2, lora_rank=2, min_len=250, max_len=260,
                val_examples=3)
    res = train(FamTrainConfig(**base, steps=2, val_every=2), out=None, progress=False)
    assert [v["step"] for v in res.validation] == [0, 2] and res.best_step is None
    examples = validation.validation_examples(PasskeyFormat(res.tokenizer), res.module.policy, 260, 3, 5)
    res.module.model.fam_prompt = res.module.prompt
    oracle = sum(passkey_answer_loss(res.module.model, res.module.policy, examples)) / 3
    assert res.validation[-1]["loss"] == pytest.approx(oracle, abs=1e-4)

    scripted = iter([3.0, 1.0, 2.0])  # step 0, 2, 4: the best is step 2
    monkeypatch.setattr(validation, "validation_loss", lambda *a, **k: next(scripted))
    res = train(FamTrainConfig(**base, steps=4, val_every=2, keep_best=True, save_every=2), out=tmp_path / "ck",
                progress=False)
    assert res.validation == [{"step": 0, "loss": 3.0}, {"step": 2, "loss": 1.0}, {"step": 4, "loss": 2.0}]
    assert res.best_step == 2
    meta = json.loads((tmp_path / "ck" / "fam.json").read_text())["train"]
    assert (meta["best_step"], meta["val_loss"], meta["steps_done"]) == (2, 1.0, 4)
    from safetensors.torch import load_file

    for name in ("prompt.safetensors", "adapter/adapter_model.safetensors"):  # the prompt and LoRA alike
        kept, step2, step4 = (load_file(str(tmp_path / n / name)) for n in ("ck", "ck-step2", "ck-step4"))
        assert all(torch.equal(kept[k], step2[k]) for k in kept) and not all(torch.equal(kept[k], step4[k]) for k in kept)
    step2 = load_file(str(tmp_path / "ck-step2" / "prompt.safetensors"))["embeddings"]
    assert torch.equal(res.module.prompt.embeddings.detach().cpu(), step2)  # the module returned is the kept one
    with pytest.raises(EndlessError, match="--keep-best needs --val-every"):
        FamTrainConfig(keep_best=True)
    assert main(["train", "fam", "--out", "x", "--val-every", "-1"]) == 2


def test_serve_fam_checkpoint_end_to_end(trained):
    """`endless serve --fam CKPT`: the flags resolve to the checkpoint's policy and weights, and a
    completion over HTTP scores and continues exactly as a FAM stream of the loaded checkpoint."""
    pytest.importorskip("fastapi")
    openai = pytest.importorskip("openai")
    from serve_helpers import running

    from endless.cli.common import inference_model, load_from_args
    from endless.cli.main import build_parser
    from endless.cli.serve import check_args
    from endless.serve.app import create_app
    from endless.serve.engine import Engine

    _, out = trained
    args = build_parser().parse_args(["serve", "--fam", str(out), "--threads", "1"])
    policy = check_args(args)
    assert policy.spec == "fam:32x1+4"
    hf, tok = load_from_args(args)
    model = inference_model(hf)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"  # serve needs one
    engine = Engine(model, tok, policy, model_name="fam")
    prompt = [int(x) for x in torch.randint(0, 256, (90,), generator=torch.Generator().manual_seed(2))]  # 3 blocks
    with running(create_app(engine)) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        r = c.completions.create(model="fam", prompt=[prompt], max_tokens=4, echo=True, logprobs=1, temperature=0)
    lp = r.choices[0].logprobs.token_logprobs
    ref_stream = Stream(model, policy)
    ref = ref_stream.feed(torch.tensor(prompt))[0]
    assert torch.allclose(torch.tensor(lp[1 : len(prompt)]), ref[1:], atol=1e-4)
    greedy = list(ref_stream.generate(4))
    assert r.choices[0].text == tok.decode(prompt + greedy)  # echo: the prompt, then the greedy tokens


def test_committed_tiny_best_model_holds_a_key_far_beyond_its_training():
    """The committed ``benchmarks/fam/models/tiny-best`` (trained on 16-96-token sequences plus
    holds with gradients through at most 1,120 tokens) still retrieves keys written at random depth
    in 4,096-token streams (512 memory updates) through the streaming path: a change to the FAM update or the streaming
    state that breaks the trained memory fails here, not only in a long benchmark."""
    from dataclasses import replace
    from pathlib import Path

    from endless.train.tiny import evaluate
    from endless.train.tiny_checkpoint import load_tiny

    folder = Path(__file__).resolve().parents[1] / "benchmarks" / "fam" / "models" / "tiny-best"
    run, cfg = load_tiny(folder)
    assert run.policy == "fam:8x1+8,null,gate,skip0"
    evaluate(run, replace(cfg, eval_lengths=(4096,), eval_examples=24, seed=11), progress=False)
    (result,) = run.results
    assert result.length == 4096 and result.n == 24 and result.accuracy >= 0.9
