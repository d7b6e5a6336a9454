"""Pooled batched decoding (one attention call over the rings of all streams) equals each stream
decoding alone, whatever the batch's make-up and however it changes between steps."""

import random

import torch
from serve_helpers import decode_alone_and_batched

from endless.models.tiny import tiny_model
from endless.serve.batch import decode_step
from endless.serve.pool import PoolSet
from endless.stream import Stream, as_transformer

# with chunk 8 the first four share one ring size (22 slots), sinks:1+6 has another (15), FAM
# attends on its own
POLICIES = ["sinks:2+12", "sinks:4+10", "window:14", "bswa:7x1", "sinks:1+6", "fam:4x1+2,firstres"]


def _model():
    return as_transformer(tiny_model("llama", seed=3))


def _streams(model, specs, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for spec, n in zip(specs, lengths, strict=True):
        s = Stream(model, spec, chunk=8)
        s.feed(torch.randint(0, 128, (n,), generator=g), logprobs=False)
        out.append(s)
    return out


def _check(alone, batched):
    expect = torch.cat([torch.log_softmax(s.last_logits, -1) for s in alone])
    got = torch.log_softmax(torch.cat([s.last_logits for s in batched]), -1)
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=0)


def test_pooled_decode_equals_alone():
    model = _model()
    specs = POLICIES * 2
    lengths = [3, 9, 17, 30, 5, 12, 21, 2, 40, 11, 16, 7]  # young, past the window, across wraps
    alone, batched = _streams(model, specs, lengths), _streams(model, specs, lengths)
    pool = PoolSet(model, rows=16)
    _check(alone, batched)
    for _ in range(13):
        assert decode_alone_and_batched(alone, batched, pool) < 1e-5
    assert sorted(pool.pools) == [15, 22]
    big, small = pool.pools[22], pool.pools[15]
    assert sorted(big.row_of(s.state) for s in batched if getattr(s.state, "capacity", 0) == 22) == list(range(8))
    assert sorted(small.row_of(s.state) for s in batched[4::6]) == [0, 1]  # the two sinks:1+6 streams
    assert [s.state.t for s in batched] == [s.state.t for s in alone]


def test_changing_batches_move_states_without_changing_results():
    """Streams join and leave between steps (rows are reused, states evicted and moved back);
    the pool has fewer rows than streams; a pooled stream saves, snapshots and prefills exactly."""
    model = _model()
    specs = [POLICIES[i % 4] for i in range(7)]
    lengths = [4, 13, 25, 8, 19, 31, 2]
    alone, batched = _streams(model, specs, lengths), _streams(model, specs, lengths)
    pool = PoolSet(model, rows=4)
    rng = random.Random(0)
    for step in range(24):
        members = sorted(rng.sample(range(7), rng.randint(1, 6)))
        rng.shuffle(members)
        tokens = [int(alone[i].next_token()) for i in members]
        for i, t in zip(members, tokens, strict=True):
            alone[i].feed(torch.tensor([t]), logprobs=False)
        decode_step([batched[i] for i in members], tokens, pool=pool)
        if step % 6 == 5:  # a new user message read by a pooled stream: the chunked path
            i = members[0]
            more = torch.randint(0, 128, (5,), generator=torch.Generator().manual_seed(step))
            alone[i].feed(more, logprobs=False)
            batched[i].feed(more, logprobs=False)
        _check(alone, batched)
    # a pooled stream's saved state, and a snapshot restored into it, continue exactly
    s = next(s for s in batched if pool.row_of(s.state) is not None)
    i = batched.index(s)
    snap = s.snapshot()
    decode_step([s, batched[(i + 1) % 7]], [5, 6], pool=pool)
    s.restore(snap)
    ref = alone[i].feed(torch.tensor([7, 8, 9]))
    torch.testing.assert_close(s.feed(torch.tensor([7, 8, 9])), ref, atol=1e-5, rtol=0)


def test_saved_pooled_stream_resumes(tmp_path):
    model = _model()
    alone, batched = _streams(model, ["sinks:2+12"] * 3, [6, 18, 27]), _streams(model, ["sinks:2+12"] * 3, [6, 18, 27])
    pool = PoolSet(model, rows=3)
    assert decode_alone_and_batched(alone, batched, pool, steps=5) < 1e-5
    assert pool.row_of(batched[1].state) is not None
    batched[1].save(tmp_path / "s.endless")
    resumed = Stream.load(tmp_path / "s.endless", model)
    ids = torch.tensor([3, 1, 4, 1, 5])
    torch.testing.assert_close(resumed.feed(ids), alone[1].feed(ids), atol=1e-5, rtol=0)
