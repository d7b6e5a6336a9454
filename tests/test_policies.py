"""Policy specs parse, round-trip and refuse bad input with one clear message."""

import pytest

from endless.errors import EndlessError
from endless.policies.spec import BSWA, FAM, Dense, PrefixSinks, Recompute, Sinks, Window, check_fits, parse_policy


@pytest.mark.parametrize(
    "spec,obj",
    [
        ("dense", Dense()),
        ("window:1024", Window(1024)),
        ("recompute:256", Recompute(256)),
        ("sinks:4+1020", Sinks(4, 1020)),
        ("sinks:4+1020,sink=#198", Sinks(4, 1020, sink_token=198)),
        ("sinks:prefix+1020", PrefixSinks(1020)),
        ("bswa:64x3", BSWA(64, 3)),
        ("fam:64x1+16", FAM(64, 1, 16)),
        ("fam:8x0+4,noffn,detach", FAM(8, 0, 4, update_ffn=False, detach=True)),
        ("fam:64x1+16,firstres", FAM(64, 1, 16, first_residual=True)),
        ("fam:64x1+16,firstres,norm", FAM(64, 1, 16, first_residual=True, normalize=True)),
    ],
)
def test_parse_and_round_trip(spec, obj):
    assert parse_policy(spec) == obj
    assert parse_policy(spec).spec == spec


@pytest.mark.parametrize(
    "spec,words",
    [
        ("sinks:1020+4", "smaller than the window"),
        ("sinks:4+4", "smaller than the window"),
        ("window:0", ">= 1"),
        ("window:4+1020", "has no sinks"),
        ("recompute:4+1020", "has no sinks"),
        ("sinks:4", "cannot parse"),
        ("fancy:3", "valid policies"),
        ("sinks:4+100,foo=1", "unknown sinks option"),
        ("fam:8x1+4,keep", "unknown fam option 'keep'; options: noffn, static, detach, firstres, norm, null"),
    ],
)
def test_bad_specs(spec, words):
    with pytest.raises(EndlessError, match=words):
        parse_policy(spec)


def test_window_larger_than_trained_context_is_refused():
    with pytest.raises(EndlessError, match="trained on 8192"):
        check_fits(parse_policy("sinks:4+9000"), 8192)
    check_fits(parse_policy("sinks:4+1020"), 8192)
    check_fits(Dense(), 8192)


def test_prefix_sinks_resolve_per_stream():
    p = parse_policy("sinks:prefix+256")
    assert p.resolve(37) == Sinks(37, 256) and p.resolve(37).spec == "sinks:37+256"
    with pytest.raises(EndlessError, match="smaller than the window"):
        p.resolve(256)  # a system prompt as long as the window leaves no room to roll
    for bad in ("sinks:prefix+0", "sinks:prefix+x", "sinks:prefix+8,sink=#1"):
        with pytest.raises(EndlessError):
            parse_policy(bad)
    from endless.policies.states import make_state

    with pytest.raises(EndlessError, match="per conversation"):
        make_state(None, p)
