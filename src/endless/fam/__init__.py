"""TransformerFAM (docs/methods.md section 3): block sliding window attention plus feedback memory.

- ``memory.py``: the learned prompt, the initial per-layer FAM, and one FAM update.
- ``parallel.py``: the exact layer-major schedule for training and evaluation.
- ``state.py``: the streaming state (ring of M blocks, current block, FAM per layer) that plugs
  into ``endless.Stream``.
The two paths agree to float tolerance (tests/test_fam.py); with F=0 both are BSWA.
"""

from endless.fam.memory import FamPrompt, initial_fam
from endless.fam.parallel import parallel_forward
from endless.fam.state import FamState

__all__ = ["FamPrompt", "initial_fam", "parallel_forward", "FamState"]
