"""The table of the SmolLM2 sweep (results 7.3) from the folders sweep_smollm2.sh wrote.

Per setting: the training loss over the last 50 steps, and at 384 and 1,024 tokens the mean answer
loss of the five digits and the mean share of digits right (benchmarks/fam-passkey-smollm2/scripts/digits.py: 24 keys at
depths 0.1-0.7, outside the window). Also writes the figures as JSON.

    python benchmarks/fam-passkey-smollm2/scripts/sweep_table.py OUT [JSON]
"""

import json
import sys
from pathlib import Path


def digits(path: Path) -> tuple[float, float] | None:
    """Mean loss and mean share right over the key's digits (the leading space token left out)."""
    if not path.exists():
        return None
    rows = {line.split()[0]: line.split()[-6:] for line in path.read_text().splitlines() if line.startswith(("loss", "argmax"))}
    if len(rows) < 2:
        return None
    loss, right = [float(x) for x in rows["loss"][1:]], [float(x) for x in rows["argmax"][1:]]
    return sum(loss) / len(loss), sum(right) / len(right)


out = Path(sys.argv[1])
table = []
for run in sorted(p for p in out.iterdir() if (p / "train.json").exists()):
    train = json.loads((run / "train.json").read_text())
    loss = train["loss"]
    row = {"setting": run.name, "policy": train["config"]["policy"], "steps": len(loss),
           "seconds": train["seconds"], "train_loss_last50": round(sum(loss[-50:]) / len(loss[-50:]), 3),
           "command": train["command"]}
    for n in (384, 1024):
        d = digits(run / f"digits_{n}.txt")
        if d:
            row[f"loss_{n}"], row[f"right_{n}"] = round(d[0], 3), round(d[1], 3)
    table.append(row)
print("| setting | policy | train loss, last 50 steps | 384: digit loss | 384: digits right | 1,024: digit loss | 1,024: digits right | train s |")
print("|---|---|---:|---:|---:|---:|---:|---:|")
for r in table:
    cells = [r.get(k, "-") for k in ("train_loss_last50", "loss_384", "right_384", "loss_1024", "right_1024")]
    print(f"| {r['setting']} | `{r['policy']}` | " + " | ".join(f"{c:.2f}" if isinstance(c, float) else str(c) for c in cells)
          + f" | {r['seconds']:.0f} |")
if len(sys.argv) > 2:
    Path(sys.argv[2]).write_text(json.dumps({"runs": table}, indent=1) + "\n")
