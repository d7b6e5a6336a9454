"""Trained models of the tiny experiment (``endless train fam-tiny --save/--load/--init``).

A trained tiny model is measured long after it was trained (at 64x a training length that
gradient holds make 1,120 tokens, 72k tokens take minutes per key batch), and a curriculum
continues from one; so it is saved, in a folder::

    tiny.json             format, policy spec, the ``TinyConfig`` it was trained with, its loss
                          curve and training time, and the sha256 of every other file
    config.json,
    model.safetensors     the transformers model (``save_pretrained``)
    prompt.safetensors    the F learned FAM prompt rows (tensor "embeddings"; absent for BSWA)

Written atomically and verified on load (``endless.files``): a missing or corrupt file,
another format, a config this version cannot read are one-line ``EndlessError``\\ s.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path

import torch

from endless.errors import EndlessError
from endless.fam.checkpoint import load_prompt, save_prompt
from endless.files import read_folder_meta, write_folder
from endless.policies.spec import parse_policy
from endless.train.tiny_config import TinyConfig, TinyRun
from endless.transformer import Transformer

FORMAT = "endless-tiny/1"
META = "tiny.json"


def save_tiny(path: "str | Path", run, cfg) -> Path:
    """Write ``run`` (an ``endless.train.tiny.TinyRun``) trained under ``cfg`` to the folder ``path``."""
    def fill(tmp: Path) -> dict:
        run.model.hf.save_pretrained(str(tmp), safe_serialization=True)
        if run.model.fam_prompt is not None:
            save_prompt(tmp, run.model.fam_prompt)
        return {"format": FORMAT, "policy": run.policy, "config": asdict(cfg),
                "seconds": round(run.seconds, 1), "loss": [round(x, 5) for x in run.losses]}

    return write_folder(path, fill, meta_name=META)


def load_tiny(path: "str | Path"):
    """``(run, cfg)``: the saved ``TinyRun`` (model in eval mode, prompt attached, its losses)
    and the ``TinyConfig`` it was trained with."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    meta = read_folder_meta(path, meta_name=META, fmt=FORMAT, what="tiny model", writer="endless train fam-tiny --save")
    try:
        known = {f.name for f in fields(TinyConfig)}
        saved = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items() if k in known}
        cfg = TinyConfig(**saved)
        policy = parse_policy(meta["policy"])
        losses = [float(x) for x in meta.get("loss", [])]
    except EndlessError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise EndlessError(f"{path / META} is damaged ({type(e).__name__}: {e})") from None
    try:
        hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    except Exception as e:
        raise EndlessError(f"cannot load the model in {path}: {type(e).__name__}: {str(e)[:120]}") from None
    if hf.config.vocab_size != cfg.vocab:
        raise EndlessError(f"{path}: the model's vocabulary ({hf.config.vocab_size}) is not its config's ({cfg.vocab})")
    hf.eval()
    model = Transformer(hf)
    model.fam_prompt = load_prompt(path, policy, hf.config.hidden_size)
    return TinyRun(meta["policy"], model, losses, float(meta.get("seconds", 0.0))), cfg


__all__ = ["save_tiny", "load_tiny", "FORMAT"]
