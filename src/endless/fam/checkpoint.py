"""FAM checkpoints: what ``endless train fam`` writes and ``--fam CHECKPOINT`` loads.

A checkpoint is a folder::

    fam.json              format, policy spec, base model (name or path) and its identity,
                          training configuration, and the sha256 of every other file
    prompt.safetensors    the F learned FAM prompt embeddings (docs/methods.md section 3: the only new
                          weights besides LoRA), float32, tensor "embeddings" (F, d); F=0 for
                          the BSWA baseline trained the same way (policy ``bswa:BxM``)
    adapter/              the LoRA adapter, peft's ``save_pretrained`` layout

Contract: written atomically (built in a temporary sibling folder, then renamed into place, so
a crash leaves the old checkpoint or the new one, never a mix); verified on load (missing
files, checksum mismatches, a different base model, an unreadable adapter are one-line
``EndlessError``\\ s). ``load_fam`` returns a ``Transformer`` whose weights have the LoRA merged,
with ``fam_prompt`` set (the streaming state picks it up) and an ``identity`` extended by the
checkpoint's digest, so a stream saved on FAM weights is never resumed on the base model.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch

from endless.errors import EndlessError
from endless.fam.memory import FamPrompt
from endless.files import read_folder_meta, write_folder
from endless.peft_quiet import quiet_peft
from endless.policies.spec import BSWA, FAM, parse_policy
from endless.transformer import Transformer

FORMAT = "endless-fam/1"
META = "fam.json"
PROMPT = "prompt.safetensors"
ADAPTER = "adapter"


def digest(meta: dict) -> str:
    """The checkpoint's identity: a hash of its policy, base model and every file's hash."""
    h = hashlib.sha256(f"{meta['policy']};{meta['base_identity']}".encode())
    for name, sha in sorted(meta["files"].items()):
        h.update(f"{name}={sha};".encode())
    return h.hexdigest()


def save_fam(path: "str | Path", peft_model, prompt: FamPrompt | None, policy: "FAM | BSWA", *, base_model: str,
             base_identity: str, train_config: dict | None = None) -> Path:
    """Write a checkpoint folder at ``path`` (replacing one that is there) and return it.

    ``peft_model`` is the (unwrapped) peft model whose adapter is saved; ``base_model`` is what
    ``endless.models.load`` will be given to rebuild the base weights. ``prompt`` is None for
    a policy without FAM rows.
    """
    def fill(tmp: Path) -> dict:
        peft_model.save_pretrained(str(tmp / ADAPTER))
        save_prompt(tmp, prompt)
        return {"format": FORMAT, "policy": policy.spec, "base_model": base_model,
                "base_identity": base_identity, "train": train_config or {}}

    return write_folder(path, fill, meta_name=META)


def copy_fam(src: "str | Path", out: "str | Path", *, adapter_dtype: "str | torch.dtype" = "bfloat16") -> Path:
    """Write a copy of the checkpoint ``src`` at ``out`` with its LoRA weights stored in
    ``adapter_dtype`` and return ``out``: the form in which a trained checkpoint is committed
    (bfloat16 halves the rank-16 SmolLM2 adapter, 19 to 10 MB).

    ``src`` is verified first; the copy is written atomically and verifies like any checkpoint.
    Loading casts the adapter back to the model's dtype, so the merged weights differ from the
    source's by the adapter's rounding only (its identity differs too: the files do). peft's
    generated model card is left out."""
    from safetensors.torch import load_file, save_file

    from endless.models import as_dtype

    dtype = as_dtype(adapter_dtype)
    src = Path(src)
    meta = read_meta(src)

    def fill(tmp: Path) -> dict:
        for name in meta["files"]:
            if name == f"{ADAPTER}/README.md":  # peft's generated model card: boilerplate, not ours
                continue
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if name.startswith(f"{ADAPTER}/") and name.endswith(".safetensors"):
                tensors = load_file(str(src / name))
                save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()},
                          str(target), metadata={"format": "pt"})
            else:
                shutil.copyfile(src / name, target)
        return {k: v for k, v in meta.items() if k != "files"}

    return write_folder(out, fill, meta_name=META)


def read_meta(path: "str | Path") -> dict:
    """The verified ``fam.json`` of a checkpoint (every listed file present with its hash)."""
    path = Path(path)
    meta = read_folder_meta(path, meta_name=META, fmt=FORMAT, what="FAM checkpoint", writer="endless train fam")
    for key in ("policy", "base_model", "base_identity"):
        if key not in meta:
            raise EndlessError(f"{path / META} lacks {key!r}; the checkpoint is damaged")
    for required in (PROMPT, f"{ADAPTER}/adapter_config.json"):
        if required not in meta["files"]:
            raise EndlessError(f"{path} is incomplete: {required} is missing")
    return meta


def save_prompt(folder: Path, prompt: FamPrompt | None) -> None:
    """Write ``prompt``'s rows to ``folder / PROMPT`` (float32, tensor "embeddings"; (0,) for None)."""
    from safetensors.torch import save_file

    rows = prompt.embeddings.detach().float().cpu().contiguous() if prompt is not None else torch.zeros(0)
    save_file({"embeddings": rows}, str(folder / PROMPT))


def load_prompt(path: Path, policy: "FAM | BSWA", width: int) -> FamPrompt | None:
    """The prompt of the folder ``path`` for ``policy`` (None without FAM rows), checked to be
    there and to hold (F, ``width``) rows for a model of hidden size ``width``."""
    from safetensors.torch import load_file

    if not isinstance(policy, FAM) or policy.fam == 0:
        return None
    if not (path / PROMPT).is_file():
        raise EndlessError(f"{path} is incomplete: {PROMPT} is missing")
    try:
        rows = load_file(str(path / PROMPT))["embeddings"]
    except Exception as e:
        raise EndlessError(f"{path / PROMPT} is unreadable ({type(e).__name__})") from None
    if tuple(rows.shape) != (policy.fam, width):
        raise EndlessError(f"{path / PROMPT} holds {tuple(rows.shape)}, the policy {policy.spec} on this model "
                           f"needs ({policy.fam}, {width})")
    return FamPrompt(rows)


def load_fam(path: "str | Path", *, dtype: "str | torch.dtype" = "float32", base_model: str | None = None,
             pack: bool = False, device: "str | torch.device | None" = None) -> tuple[Transformer, object, "FAM | BSWA"]:
    """``(model, tokenizer, policy)`` from a checkpoint: the base model (or ``base_model``, if
    it moved) with the LoRA merged, ``model.fam_prompt`` set and a checkpoint-specific identity,
    on ``device`` (default: the CPU). ``pack`` adds the packed inference weights (CPU: faster
    streaming, one more copy). A checkpoint trained on one device loads on any other."""
    from endless.models import as_dtype, load, model_identity

    want = as_dtype(dtype)  # a bad dtype fails before anything loads
    path = Path(path)
    meta = read_meta(path)
    policy = parse_policy(meta["policy"])
    if not isinstance(policy, (FAM, BSWA)):
        raise EndlessError(f"{path} records policy {policy.spec}, not a fam:BxM+F or bswa:BxM policy")
    try:
        from peft import PeftModel
    except ImportError:
        raise EndlessError("loading a FAM checkpoint needs peft: pip install 'endless-lm[train]'") from None
    # The identity hashes weight values, so the base is checked (and the LoRA merged) in the
    # dtype it was trained in; the merged model is then cast to ``dtype``.
    train_dtype = str(meta.get("train", {}).get("dtype", "float32"))
    hf, tok = load(base_model or meta["base_model"], dtype=train_dtype)
    if model_identity(hf) != meta["base_identity"]:
        raise EndlessError(
            f"{path} was trained on another base model ({meta['base_identity']}) than "
            f"{base_model or meta['base_model']} ({model_identity(hf)})"
        )
    try:
        with quiet_peft():
            merged = PeftModel.from_pretrained(hf, str(path / ADAPTER)).merge_and_unload()
    except Exception as e:
        raise EndlessError(f"cannot apply the adapter in {path / ADAPTER}: {type(e).__name__}: {str(e)[:120]}") from None
    merged.eval()
    if want != merged.dtype:
        merged = merged.to(want)
    model = Transformer(merged, pack=pack, device=device)
    prompt = load_prompt(path, policy, merged.config.hidden_size)
    model.fam_prompt = None if prompt is None else prompt.to(model.device)
    model.identity = f"{model.identity}+fam-{digest(meta)[:16]}"
    return model, tok, policy


__all__ = ["save_fam", "copy_fam", "load_fam", "read_meta", "load_prompt", "save_prompt", "digest", "FORMAT"]
