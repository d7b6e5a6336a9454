"""Crash-safe state (issue 24): SIGKILL at random moments of a save, a full disk, foreign files.

A forked child (torch already imported, so a round costs milliseconds, not an interpreter start)
saves to one path in a loop; the parent kills it with SIGKILL after a random delay, then the
path must load and verify (checksum, or every file's hash for a checkpoint folder) as one of the
states the child wrote, never a torn one. Stray temporaries are hidden ('.NAME.tmp-PID.*'), never
read as state, and removed by the next save. ``ENDLESS_KILLS`` sets the kills per kind (CI: 20;
the issue's 200: ``ENDLESS_KILLS=200 pytest tests/test_crash_safety.py``).
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import pathlib
import random
import signal
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from endless.cli.main import main
from endless.errors import EndlessError
from endless.files import read_folder_meta, write_folder
from endless.models import load
from endless.models.tiny import tiny_model
from endless.state_io import read_state
from endless.stream import Stream
from endless.transformer import Transformer

KILLS = int(os.environ.get("ENDLESS_KILLS", "20"))
FORK = multiprocessing.get_context("fork")
POLICY, CHUNK = "sinks:4+250", 2048  # a ~1 MB state: the write, not the bookkeeping, fills the loop


@pytest.fixture(scope="module")
def model():
    return Transformer(tiny_model("llama", seed=0))


def ids(step: int) -> torch.Tensor:
    return (torch.arange(16) * 7 + step) % 128


def _quiet_child() -> None:
    """In a forked saver: no progress bars. tqdm guards its bars with a lock shared across fork
    (a multiprocessing lock); a saver killed while drawing one would leave it held, and the
    parent's next bar (transformers' "Loading weights" in ``check``) would wait forever."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)


def _stream_saver(path: str, model, start: int, ready) -> None:
    _quiet_child()
    s = Stream(model, POLICY, chunk=CHUNK)
    step = start
    while True:
        s.feed(ids(step))
        # a chat session is this file with the transcript in its extras
        s.save(path, extra={"step": str(step), "messages": json.dumps([{"role": "user", "content": "x" * step}])})
        ready.set()
        step += 1


def kill_rounds(target, args, kills: int, check, seed: int) -> dict:
    """Run ``kills`` rounds of: fork ``target(*args, start, ready)``, wait for its first save,
    sleep a random 0-60 ms, SIGKILL, then ``check()`` (raises on a torn state). Returns counts."""
    rng = random.Random(seed)
    torn, mid_write = [], 0
    for k in range(kills):
        ready = FORK.Event()
        p = FORK.Process(target=target, args=(*args, 1000 * (k + 1), ready), daemon=True)
        p.start()
        assert ready.wait(60), "the saver never finished a first save"
        time.sleep(rng.uniform(0, 0.06))
        os.kill(p.pid, signal.SIGKILL)
        p.join()  # reaped: its pid is dead, so the next save may clean its temporaries
        folder = pathlib.Path(args[0]).parent
        mid_write += any(".tmp-" in f.name or ".old-" in f.name for f in folder.iterdir())
        try:
            check()
        except Exception as e:  # a torn state: recorded, reported together
            torn.append(f"kill {k}: {type(e).__name__}: {e}")
    return {"kills": kills, "torn": torn, "mid_write": mid_write}


def test_sigkill_while_saving_a_stream_or_session_never_tears_it(model, tmp_path):
    path = tmp_path / "s.st"
    Stream(model, POLICY, chunk=CHUNK).save(path)  # an older state is there from the start

    def check():
        _, meta = read_state(path)  # checksum verified
        restored = Stream.load(path, model)
        step = int(meta["extra.step"])
        assert restored.fed == 16 * (step % 1000 + 1)
        assert json.loads(restored.saved_extra["messages"])[0]["content"] == "x" * step
        for f in tmp_path.iterdir():
            assert f == path or (f.name.startswith(".") and ".tmp-" in f.name), f

    out = kill_rounds(_stream_saver, (str(path), model), KILLS, check, seed=1)
    assert out["torn"] == [], out
    Stream.load(path, model).save(path)  # the next save removes the dead writers' temporaries
    assert [f.name for f in tmp_path.iterdir()] == ["s.st"]
    print(f"\nstream kills: {out['kills']}, torn 0, killed with a temporary on disk {out['mid_write']}")


def _tiny_saver(path: str, start: int, ready) -> None:
    from endless.train.tiny_checkpoint import save_tiny
    from endless.train.tiny_config import TinyConfig, TinyRun

    _quiet_child()
    run = TinyRun("bswa:8x1", Transformer(tiny_model("llama", seed=0)), [], 0.0)
    run.model.fam_prompt = None  # BSWA: no prompt rows
    step = start
    while True:
        run.losses = [float(step)]
        save_tiny(path, run, TinyConfig())
        ready.set()
        step += 1


def test_sigkill_while_saving_a_tiny_checkpoint_never_tears_it(tmp_path):
    from endless.train.tiny_checkpoint import load_tiny

    path = tmp_path / "tiny"

    def check():
        run, _ = load_tiny(path)  # every file's hash verified
        assert len(run.losses) == 1 and run.losses[0] >= 1000

    out = kill_rounds(_tiny_saver, (str(path),), max(KILLS // 2, 2), check, seed=2)
    assert out["torn"] == [], out
    print(f"\ntiny checkpoint kills: {out['kills']}, torn 0, with a temporary on disk {out['mid_write']}")


def _fam_saver(path: str, start: int, ready) -> None:
    from peft import LoraConfig, get_peft_model

    from endless.fam.checkpoint import save_fam
    from endless.fam.memory import FamPrompt
    from endless.models.arch import model_identity
    from endless.policies.spec import parse_policy

    _quiet_child()
    hf, _ = load("tiny:llama")
    identity = model_identity(hf)
    peft = get_peft_model(hf, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    prompt = FamPrompt(torch.randn(4, 64))
    step = start
    while True:
        save_fam(path, peft, prompt, parse_policy("fam:8x1+4"), base_model="tiny:llama", base_identity=identity,
                 train_config={"step": step})
        ready.set()
        step += 1


def test_sigkill_while_saving_a_fam_checkpoint_never_tears_it(tmp_path):
    pytest.importorskip("peft")
    from endless.fam.checkpoint import load_fam, read_meta

    path = tmp_path / "fam"

    def check():
        assert read_meta(path)["train"]["step"] >= 1000  # every file's hash verified

    out = kill_rounds(_fam_saver, (str(path),), max(KILLS // 2, 2), check, seed=3)
    assert out["torn"] == [], out
    model, _, policy = load_fam(path)
    assert policy.spec == "fam:8x1+4" and model.fam_prompt is not None
    print(f"\nFAM checkpoint kills: {out['kills']}, torn 0, with a temporary on disk {out['mid_write']}")


def test_a_writer_killed_between_the_folder_renames_leaves_the_old_folder(tmp_path):
    """The one moment a folder write is not a single rename: the old folder moved aside, the new
    not yet in. The next reader (or writer) puts the old one back."""
    path = tmp_path / "ck"
    write_folder(path, lambda tmp: (tmp / "a.txt").write_text("old") and {"format": "x/1"}, meta_name="m.json")
    p = FORK.Process(target=os._exit, args=(0,))
    p.start()
    p.join()  # a pid that is surely dead
    os.replace(path, tmp_path / f".ck.old-{p.pid}")
    meta = read_folder_meta(path, meta_name="m.json", fmt="x/1", what="test folder", writer="test")
    assert (path / "a.txt").read_text() == "old" and "a.txt" in meta["files"]


def _no_space(monkeypatch, cls=pathlib.Path, name="write_bytes"):
    """Make ``cls.name`` write half its data, then fail as a full disk does."""
    real = getattr(cls, name)

    def half_then_enospc(self, data, *a, **k):
        real(self, data[: len(data) // 2], *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cls, name, half_then_enospc)


def test_full_disk_keeps_the_old_stream_and_says_so(model, tmp_path, monkeypatch):
    path = tmp_path / "s.st"
    s = Stream(model, "sinks:4+20")
    s.feed(ids(0))
    s.save(path)
    good = path.read_bytes()
    s.feed(ids(1))
    _no_space(monkeypatch)
    with pytest.raises(EndlessError, match=r"cannot save .*s\.st: the disk is full; the previous file, if any, is unchanged"):
        s.save(path)
    assert path.read_bytes() == good and [f.name for f in tmp_path.iterdir()] == ["s.st"]


def test_full_disk_keeps_the_old_checkpoint_folder(tmp_path):
    path = tmp_path / "ck"
    write_folder(path, lambda tmp: (tmp / "w.bin").write_bytes(b"old") and {"format": "x/1"}, meta_name="m.json")

    def fill(tmp):
        (tmp / "w.bin").write_bytes(b"new, half written")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(EndlessError, match="the disk is full"):
        write_folder(path, fill, meta_name="m.json")
    assert (path / "w.bin").read_bytes() == b"old" and [f.name for f in tmp_path.iterdir()] == ["ck"]


def test_full_disk_in_the_cli_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    tiny_model("llama", seed=0).save_pretrained(tmp_path / "m")
    out = tmp_path / "info.json"
    out.write_text("{}\n")
    capsys.readouterr()  # save_pretrained's progress bar is not the command's output
    _no_space(monkeypatch, name="write_text")
    assert main(["info", "--model", str(tmp_path / "m"), "--threads", "1", "--json", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("endless: error: cannot save") and "disk is full" in err[0], err
    assert out.read_text() == "{}\n"


def test_state_from_another_dtype_or_version_is_refused_with_what_differs(model, tmp_path):
    path = tmp_path / "s.st"
    s = Stream(model, "sinks:4+20")
    s.feed(ids(0))
    s.save(path)
    bf16 = Transformer(tiny_model("llama", seed=0).to(torch.bfloat16))
    with pytest.raises(EndlessError, match=r"another dtype \(float32 vs bfloat16\)"):
        Stream.load(path, bf16)
    with pytest.raises(EndlessError, match=r"another model .*another policy \(sinks:4\+20 vs sinks:4\+60\)"):
        Stream.load(path, Transformer(tiny_model("llama", seed=5)), policy="sinks:4+60")
    _, meta = read_state(path)
    tensors = load_file(str(path))
    future = {**meta, "format": "endless-stream/9"}
    save_file(tensors, str(tmp_path / "future.st"), metadata=future)
    with pytest.raises(EndlessError, match="endless-stream/9, a format this version .* cannot read"):
        Stream.load(tmp_path / "future.st", model)
    older = {k: v for k, v in meta.items() if k not in ("dtype", "written_by")} | {"format": "endless-stream/1"}
    save_file(tensors, str(tmp_path / "old.st"), metadata=older)
    assert Stream.load(tmp_path / "old.st", model).fed == 16  # files of the previous format still load


def test_checkpoints_of_another_version_are_refused_with_the_format(tmp_path):
    from endless.train.tiny_checkpoint import load_tiny, save_tiny
    from endless.train.tiny_config import TinyConfig, TinyRun

    run = TinyRun("bswa:8x1", Transformer(tiny_model("llama", seed=0)), [1.0], 0.0)
    run.model.fam_prompt = None
    save_tiny(tmp_path / "t", run, TinyConfig())
    meta = json.loads((tmp_path / "t" / "tiny.json").read_text())
    (tmp_path / "t" / "tiny.json").write_text(json.dumps({**meta, "format": "endless-tiny/9"}))
    with pytest.raises(EndlessError, match="format 'endless-tiny/9'.*reads endless-tiny/1"):
        load_tiny(tmp_path / "t")
