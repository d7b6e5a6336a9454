"""Which digits of the pass key a trained checkpoint gets right (results 7.3).

Teacher-forced through the parallel FAM schedule: for PassKey prompts of N tokens with the key
at depths 0.1 / 0.3 / 0.5 / 0.7 (outside a 64x1 window), the loss and the argmax accuracy of
each answer token given the prompt and the true earlier digits. Exact match needs all five
digits right at once; this shows how far a checkpoint is from it, digit by digit.

    python benchmarks/fam-passkey-smollm2/scripts/digits.py CHECKPOINT [N] [D,D,...]

D: other key depths (six keys each). With N a whole number of blocks the answer opens a new block
(``train fam --align``), otherwise it continues the question's.
"""

import random
import sys

import torch
import torch.nn.functional as F

from endless.bench.timing import machine
from endless.data.passkey import PasskeyFormat, answer_positions, random_key
from endless.fam import parallel_forward
from endless.fam.checkpoint import load_fam

torch.set_num_threads(1)
model, tok, policy = load_fam(sys.argv[1])
n = int(sys.argv[2]) if len(sys.argv) > 2 else 384
depths = [float(d) for d in sys.argv[3].split(",")] if len(sys.argv) > 3 else [0.1, 0.3, 0.5, 0.7]
fmt = PasskeyFormat(tok)
rng = random.Random(5)
examples = [fmt.example(n, d, random_key(rng, 5)) for d in depths for _ in range(6)]
loss = right = 0.0
with torch.no_grad():
    for e in examples:
        ids = torch.tensor([e.ids])
        select = torch.zeros_like(ids, dtype=torch.bool)
        select[0, answer_positions(e)] = True
        logits = parallel_forward(model, ids, policy, model.fam_prompt, select=select)
        target = torch.tensor(e.answer)
        loss = loss + F.cross_entropy(logits.float(), target, reduction="none")
        right = right + (logits.argmax(-1) == target).float()
m = machine()
print(f"machine: {m['cpu']}, family {m.get('cpu_family')} model {m.get('cpu_model')}, {m['threads']} thread(s)")
print(f"{sys.argv[1]} ({policy.spec}), {n} tokens, {len(examples)} keys at depths {','.join(map(str, depths))}")
print("answer tokens  ", " ".join(f"{tok.decode([t])!r:>6}" for t in examples[0].answer), "(first example)")
print("loss           ", " ".join(f"{x:6.3f}" for x in (loss / len(examples)).tolist()))
print("argmax right   ", " ".join(f"{x:6.2f}" for x in (right / len(examples)).tolist()))
