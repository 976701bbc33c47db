"""Checkpoints: round trip, atomic writes (also under kill -9), and clear errors for files we cannot use."""

import errno
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from train_helpers import one_thread, small_data, tiny_config  # noqa: F401

from ebmfast.errors import OutputPathError, UsageError
from ebmfast.models import CNNModel
from ebmfast.training.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    load_checkpoint,
    load_model,
    model_record,
    remove_stale_temps,
    save_checkpoint,
)
from ebmfast.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    tr = Trainer(
        tiny_config(max_iterations=3, sample_every=0), data=small_data(), device="cpu", out_dir=out, progress=False
    )
    tr.fit()
    tr.close()
    torch.set_num_threads(n)
    return out / "checkpoints" / "last.pt", tr


@pytest.mark.slow
def test_round_trip(trained_ckpt):
    path, tr = trained_ckpt
    model, config = load_model(path)
    assert isinstance(model, CNNModel) and not model.training
    assert config == tr.config.to_dict()
    for (name, p), q in zip(model.state_dict().items(), tr.model.state_dict().values()):
        assert torch.equal(p, q), name
    ckpt = load_checkpoint(path)
    assert ckpt["format_version"] == FORMAT_VERSION and ckpt["kind"] == "train"
    t = ckpt["trainer"]
    assert t["iteration"] == 3 and t["epoch"] == 0
    assert set(t) >= {"optimizer", "scheduler", "buffer", "generator", "sampler", "batches", "rng"}
    assert torch.equal(t["buffer"]["storage"], tr.buffer.storage)
    assert t["sampler"] == tr.sampler.state_dict()
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model(x), tr.model.eval()(x))


def test_checkpoint_error_is_a_usage_error():
    assert issubclass(CheckpointError, ValueError) and issubclass(CheckpointError, UsageError)


def _expect(path, pattern, loader=load_checkpoint):
    with pytest.raises(CheckpointError, match=pattern):
        loader(path)


@pytest.mark.slow
def test_bad_checkpoints_give_clear_errors(tmp_path, trained_ckpt):
    good, _ = trained_ckpt
    _expect(tmp_path / "missing.pt", "no checkpoint at")
    _expect(tmp_path, "is a folder")
    (tmp_path / "empty.pt").write_bytes(b"")
    _expect(tmp_path / "empty.pt", "empty")
    data = good.read_bytes()
    for frac in (0.01, 0.5, 0.99):
        p = tmp_path / f"trunc{frac}.pt"
        p.write_bytes(data[: int(len(data) * frac)])
        _expect(p, "truncated, corrupted")
    (tmp_path / "noise.pt").write_bytes(os.urandom(4096))
    _expect(tmp_path / "noise.pt", "truncated, corrupted|not an ebmfast checkpoint")
    torch.save({"state_dict": CNNModel(8).state_dict()}, tmp_path / "foreign.pt")
    _expect(tmp_path / "foreign.pt", "not an ebmfast checkpoint")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    _expect(tmp_path / "list.pt", "not an ebmfast checkpoint")
    with open(tmp_path / "pickle.pt", "wb") as fh:  # arbitrary objects are refused, not executed
        torch.save({"format": "ebmfast.checkpoint", "obj": random.Random(0)}, fh, pickle_module=pickle)
    _expect(tmp_path / "pickle.pt", "not an ebmfast checkpoint|safe load")
    save_checkpoint(tmp_path / "plain.pt", {"kind": "train"})
    torch.save({**torch.load(tmp_path / "plain.pt"), "format_version": FORMAT_VERSION + 1}, tmp_path / "newer.pt")
    _expect(tmp_path / "newer.pt", "newer ebmfast")
    _expect(tmp_path / "plain.pt", "no usable model record", loader=load_model)


def test_other_model_config_is_refused(tmp_path):
    rec = model_record(CNNModel(16))
    rec["kwargs"]["hidden_features"] = 32  # weights of a 16-wide model described as 32-wide
    save_checkpoint(tmp_path / "mismatch.pt", {"model": rec, "config": {"hidden_features": 32}})
    _expect(tmp_path / "mismatch.pt", r"do not fit CNNModel", loader=load_model)
    rec = model_record(CNNModel(16))
    save_checkpoint(tmp_path / "cfg.pt", {"model": rec, "config": {"hidden_features": 8}})
    _expect(tmp_path / "cfg.pt", "hidden_features=8", loader=load_model)
    rec = model_record(CNNModel(16))
    rec["class"] = "ResNet"
    save_checkpoint(tmp_path / "cls.pt", {"model": rec, "config": {}})
    _expect(tmp_path / "cls.pt", "ResNet", loader=load_model)
    rec = model_record(CNNModel(8))
    rec["state_dict"]["cnn_layers.0.bias"][0] = float("nan")
    save_checkpoint(tmp_path / "nan.pt", {"model": rec, "config": {}})
    _expect(tmp_path / "nan.pt", "non-finite", loader=load_model)


@pytest.mark.slow
def test_resume_with_other_model_config_is_refused(trained_ckpt, tmp_path):
    path, _ = trained_ckpt
    with pytest.raises(CheckpointError, match="hidden_features=8"):
        Trainer(tiny_config(hidden_features=16), data=small_data(), device="cpu", out_dir=tmp_path, resume=path)
    with pytest.raises(CheckpointError, match="buffer"):
        Trainer(tiny_config(buffer_size=256), data=small_data(), device="cpu", out_dir=tmp_path, resume=path)
    assert not (tmp_path / "metrics.csv").exists()  # nothing written before the checks


@pytest.mark.parametrize(
    "err, cause",
    [
        (errno.ENOSPC, "no space left"),
        (errno.EDQUOT, "quota"),
        (errno.EACCES, "permission denied"),
        (errno.EFBIG, "file-size limit"),
        (errno.EIO, None),  # not a fault of the machine's space or the path: shown in full
    ],
)
def test_failed_save_keeps_the_old_file(err, cause, tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"value": torch.tensor([1.0])})

    def broken_save(obj, fh, *a, **k):
        fh.write(b"partial bytes")
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(torch, "save", broken_save)
    if cause is None:
        with pytest.raises(OSError) as info:
            save_checkpoint(path, {"value": torch.tensor([2.0])})
        assert not isinstance(info.value, UsageError)
    else:
        with pytest.raises(OutputPathError, match=f"cannot write checkpoint {path}: .*{cause}.*unchanged"):
            save_checkpoint(path, {"value": torch.tensor([2.0])})
    monkeypatch.undo()
    assert load_checkpoint(path)["value"].item() == 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # the temporary file was removed


_FSIZE_SAVER = textwrap.dedent(
    """
    import resource, sys, torch
    from ebmfast.errors import OutputPathError
    from ebmfast.training.checkpoint import save_checkpoint
    save_checkpoint(sys.argv[1], {"big": torch.ones(1000)})  # 4 kB: fits
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # 1 MiB per file
    try:
        save_checkpoint(sys.argv[1], {"big": torch.zeros(1_000_000)})  # 4 MB: EFBIG
    except OutputPathError as exc:
        print(exc)
    """
)


def test_file_size_limit_is_one_line_and_keeps_the_old_file(tmp_path):
    """A real EFBIG (RLIMIT_FSIZE in a child process; Python ignores SIGXFSZ, so the write fails with EFBIG)."""
    path = tmp_path / "c.pt"
    res = subprocess.run([sys.executable, "-c", _FSIZE_SAVER, str(path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert f"cannot write checkpoint {path}: file too large" in res.stdout and "unchanged" in res.stdout, res.stdout
    assert bool((load_checkpoint(path)["big"] == 1).all())
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_save_argument_checks(tmp_path):
    with pytest.raises(TypeError, match="dict"):
        save_checkpoint(tmp_path / "x.pt", [1])
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "x.pt", {"format_version": 3})
    with pytest.raises(IsADirectoryError):
        save_checkpoint(tmp_path, {"a": 1})


_SAVER = textwrap.dedent(
    """
    import sys, torch
    from ebmfast.training.checkpoint import save_checkpoint
    path = sys.argv[1]
    i = int(sys.argv[2])
    big = torch.empty(6_000_000)  # 24 MB: a save takes long enough to be caught in the middle
    while True:
        i += 1
        big.fill_(float(i))
        save_checkpoint(path, {"i": i, "big": big})
        print(i, flush=True)
    """
)


@pytest.mark.slow
def test_kill_9_during_save_leaves_a_loadable_checkpoint(tmp_path):
    """A subprocess saves a 24 MB checkpoint in a loop; we kill -9 it at random moments (at least 3 times, until a
    kill has landed mid-save, at most 8). Each time the file on disk must load and be self-consistent (its tensor
    filled with its own counter), never torn."""
    path = tmp_path / "ckpt.pt"
    rng = random.Random(0)
    counter = 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for kills in range(1, 9):
        proc = subprocess.Popen(
            [sys.executable, "-c", _SAVER, str(path), str(counter)], stdout=subprocess.PIPE, text=True, env=env
        )
        try:
            first = proc.stdout.readline()  # one complete save, so there is a previous checkpoint
            assert first.strip(), f"saver produced no output (rc {proc.poll()})"
            time.sleep(rng.uniform(0.0, 0.4))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL
        ckpt = load_checkpoint(path)
        assert ckpt["i"] > counter
        big = ckpt["big"]
        assert big.numel() == 6_000_000 and bool((big == float(ckpt["i"])).all()), "torn checkpoint"
        counter = ckpt["i"]
        if kills >= 3 and list(tmp_path.glob(".*.tmp")):
            break
    leftovers = list(tmp_path.glob(".*.tmp"))
    # The saver spends nearly all its time inside save_checkpoint, so kills land mid-save and leave temp files;
    # without any, this test would not have tested anything (a plain torch.save loop fails it 5 times in 6).
    assert leftovers, "no kill landed during a save"
    removed = remove_stale_temps(tmp_path)
    assert sorted(removed) == sorted(leftovers)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
