"""One decoded token's attention over a full bfloat16 ring, in the forms PyTorch's CPU kernels offer.

SmolLM2-135M's shapes (30 layers, 3 KV heads of 64, 3 query heads each, a separate query row for
StreamingLLM's sink columns), 30 distinct key/value buffers so a token reads them as a real one
does. Forms: ours (``endless.attention.Kernel.one``: scores as queries @ keys^T, softmax, mix);
the scores alone as queries @ keys^T and as keys @ queries^T; PyTorch's fused SDPA (one query
row, no sink columns); ``flex_attention`` under torch.compile (CPU: no log-sum-exp, so no way to
merge the sink columns). ms a token, median of rounds; JSON with the machine.

    OMP_NUM_THREADS=1 python benchmarks/bench-xeon/scripts/attention_forms.py 1 OUT.json
"""
import json
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from endless.attention import Kernel
from endless.bench.timing import machine

threads, out = int(sys.argv[1]), sys.argv[2]
torch.set_num_threads(threads)
torch.set_grad_enabled(False)
L, KV, G, D = 30, 3, 3, 64


def ms(fn, reps=10, rounds=3):
    fn()
    best = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        best.append((time.perf_counter() - t) / reps * 1e3)
    return sorted(best)[len(best) // 2]


flex = torch.compile(flex_attention, dynamic=False)
result = {"threads": threads, "machine": machine(), "torch": torch.__version__, "rows": []}
for n in (1152, 4224):
    ks = [torch.randn(1, KV, n, D, dtype=torch.bfloat16) for _ in range(L)]
    vs = [torch.randn(1, KV, n, D, dtype=torch.bfloat16) for _ in range(L)]
    kern, bias = Kernel(4), torch.zeros(1, n, dtype=torch.bfloat16)
    qq = torch.randn(KV * G, 2 * D, dtype=torch.bfloat16)  # rows [query at t | query at S+W]
    q = torch.randn(1, KV, G, D, dtype=torch.bfloat16)
    q2 = torch.randn(KV, 2 * G, D, dtype=torch.bfloat16)
    q2t = q2.transpose(1, 2).contiguous()
    row = {"slots": n, "kv_mb_per_token": 2 * L * KV * n * D * 2 / 1e6,
           "ours_ms": ms(lambda: [kern.one(qq, ks[i], vs[i], bias, (1, KV * G, KV, D)) for i in range(L)]),
           "scores_q_kT_ms": ms(lambda: [torch.bmm(q2, ks[i][0].transpose(1, 2)) for i in range(L)]),
           "scores_k_qT_ms": ms(lambda: [torch.bmm(ks[i][0], q2t) for i in range(L)]),
           "sdpa_ms": ms(lambda: [F.scaled_dot_product_attention(q, ks[i], vs[i], scale=1.0) for i in range(L)]),
           "flex_compiled_ms": ms(lambda: [flex(q, ks[i], vs[i], scale=1.0) for i in range(L)])}
    print(json.dumps(row), flush=True)
    result["rows"].append(row)
result["command"] = "python " + " ".join(sys.argv)
with open(out, "w") as f:
    json.dump(result, f, indent=1)
