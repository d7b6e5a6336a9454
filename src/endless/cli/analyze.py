"""``endless analyze attention``: where attention goes -- the attention sinks of docs/methods.md
section 2 (Figure 2), measured on any supported model."""

from __future__ import annotations

import argparse
from pathlib import Path

from endless.cli.common import add_model_args, load_from_args, write_json
from endless.errors import EndlessError
from endless.validate import BIG, int_range, number_list


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="analyses of the model's attention (attention sinks)",
                       description="Analyses of where a model's attention goes: `attention` measures attention sinks.")
    asub = p.add_subparsers(dest="analyze_what", metavar="WHAT")
    a = asub.add_parser(
        "attention", help="share of attention on the first tokens, per layer and head; attention maps",
        description=(
            "Run the model densely over the first --tokens tokens of a text and measure, for every layer and "
            "head, the share of attention that lands on the first k tokens (--first), against what uniform "
            "attention would give. Prints a per-layer table; --plot draws head-averaged attention maps of "
            "--layers over the first --map-tokens tokens (the paper's Figure 2); --bars a per-layer bar chart "
            "of attention on token 0; --json every figure, per head."
        ),
    )
    add_model_args(a, dtype_default="float32")
    a.add_argument("--text", default=None, metavar="FILE", help="UTF-8 text file, or kjv (default), shakespeare, kjv-heldout, shakespeare-heldout")
    a.add_argument("--tokens", type=int_range("--tokens", 2, BIG), default=256, help="tokens analysed (default: %(default)s)")
    a.add_argument("--first", type=number_list(int, low=1, what="first-k counts"), default=(1, 4), metavar="K,K",
                   help="measure attention on the first k tokens for each k (default: 1,4)")
    a.add_argument("--layers", type=number_list(int, low=0, what="layers"), default=None, metavar="L,L",
                   help="layers drawn in --plot (default: first two, middle, last)")
    a.add_argument("--map-tokens", type=int_range("--map-tokens", 2, BIG), default=16, help="tokens shown in each map (default: %(default)s)")
    a.add_argument("--plot", type=Path, default=None, metavar="PNG", help="attention maps of --layers")
    a.add_argument("--bars", type=Path, default=None, metavar="PNG", help="per-layer attention on token 0")
    a.add_argument("--prefix-token", type=int_range("--prefix-token", 0, BIG), default=None, metavar="ID",
                   help="put token ID before the text (it becomes token 0): a learnable sink token, as in "
                        "`eval sinks --prefix-token`")
    a.add_argument("--json", type=Path, default=None, metavar="PATH")
    a.set_defaults(func=run_attention)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_attention(args: argparse.Namespace) -> int:
    from endless.analysis.attention import attention_maps, first_k_share, plot_maps, plot_token0, uniform_share
    from endless.data.texts import text_ids
    from endless.stream import as_transformer

    if max(args.first) >= args.tokens or min(args.first) < 1:
        raise EndlessError(f"--first values must be in 1..{args.tokens - 1}")
    hf, tok = load_from_args(args)
    model = as_transformer(hf)
    n_layers = model.dims.n_layers
    layers = args.layers or tuple(dict.fromkeys(i for i in (0, 1, n_layers // 2, n_layers - 1) if i < n_layers))
    if max(layers) >= n_layers:
        raise EndlessError(f"--layers must be in 0..{n_layers - 1}")
    ids = text_ids(tok, args.text, args.tokens)
    if args.prefix_token is not None:  # the sink token the model was trained with, as token 0
        import torch

        if args.prefix_token >= model.dims.vocab:
            raise EndlessError(f"--prefix-token {args.prefix_token} is not below the vocabulary size {model.dims.vocab}")
        ids = torch.cat([ids.new_tensor([args.prefix_token]), ids[:-1]])
    maps = attention_maps(model, ids)
    shares = {k: first_k_share(maps, k) for k in args.first}
    uniform = {k: uniform_share(ids.numel(), k) for k in args.first}
    name = args.fam or args.model
    print(f"{ids.numel()} tokens of {args.text or 'kjv'}; share of attention on the first k tokens "
          f"(mean over heads; uniform attention would give " + ", ".join(f"k={k}: {u:.3f}" for k, u in uniform.items()) + ")")
    print("layer  " + "  ".join(f"{'k=' + str(k):>7s} {'max head':>8s}" for k in args.first))
    for layer in range(n_layers):
        print(f"{layer:5d}  " + "  ".join(f"{float(s[layer].mean()):7.3f} {float(s[layer].max()):8.3f}"
                                      for s in shares.values()))
    deep = slice(2, None) if n_layers > 2 else slice(None)
    for k, s in shares.items():
        print(f"k={k}: mean over layers {deep.start or 0}..{n_layers - 1}: {float(s[deep].mean()):.3f}")
    if args.json:
        write_json(args.json, {
            "model": name, "identity": model.identity, "dtype": args.dtype, "text": str(args.text or "kjv"),
            "tokens": ids.numel(), "layers": n_layers, "heads": maps.shape[1], "prefix_token": args.prefix_token,
            "first_k": {str(k): {"per_layer_mean": s.mean(1).tolist(), "per_head": s.tolist(),
                                 "uniform": uniform[k], "mean_layers_2_plus": float(s[deep].mean())}
                        for k, s in shares.items()},
        })
    if args.plot:
        labels = [tok.decode([int(t)]) for t in ids[: args.map_tokens]]
        plot_maps(maps, layers, args.plot, tokens=args.map_tokens, labels=labels)
    if args.bars:
        share0 = first_k_share(maps, 1)
        plot_token0(share0, args.bars, uniform=uniform_share(ids.numel(), 1),
                    title=f"Attention on token 0 ({name}, {ids.numel()} tokens)")
    return 0
