"""Every mistake a user can make on the command line ends the same way: exit code 2, exactly one line on stderr
saying what is wrong, no traceback, and no output written. One table of bad invocations of every command, run
in-process through ``ebmfast.cli.main`` (argparse's own errors raise SystemExit(2)); one of them also as a real
``python -m ebmfast`` process, for the exit code a shell sees."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ebmfast.cli import main

_ENOENT = os.strerror(errno.ENOENT)
CKPT = str(Path(__file__).parent / "data" / "checkpoint_v1.pt")  # a real training checkpoint (hidden_features=2)
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")


@pytest.fixture
def paths(tmp_path):
    """Placeholders used in the table: OUT (a folder nothing may be written to), MISSING, FOREIGN (a torch file that
    is not an ebmfast checkpoint), FILE (a plain file), OTHER_CSV (a CSV with other columns), MODEL (a copy of a
    training checkpoint), MODEL_PNG (the same under a picture's name), RUN (a run folder whose classifier cache path
    holds a checkpoint). None of them may change."""
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    (tmp_path / "file.txt").write_text("not a folder\n")
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    shutil.copyfile(CKPT, tmp_path / "model.pt")
    shutil.copyfile(CKPT, tmp_path / "model.png")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    shutil.copyfile(CKPT, tmp_path / "run" / "checkpoints" / "mnist_classifier.pt")  # not a classifier cache
    return {
        "RUN": tmp_path / "run",
        "MODEL": tmp_path / "model.pt",
        "MODEL_PNG": tmp_path / "model.png",
        "OUT": tmp_path / "out",
        "MISSING": tmp_path / "missing.pt",
        "FOREIGN": tmp_path / "foreign.pt",
        "FILE": tmp_path / "file.txt",
        "OTHER_CSV": tmp_path / "other.csv",
    }


TRAIN = ["train", "--out", "OUT", "--device", "cpu"]
SAMPLE = ["sample", "--checkpoint", CKPT, "--out", "OUT/grid.png", "--device", "cpu"]
EVALUATE = ["evaluate", "--checkpoint", CKPT, "--out", "OUT", "--device", "cpu", "--quiet"]
BENCH = ["bench", "--device", "cpu", "--no-progress", "--json", "OUT/b.json"]

# (argv, a piece of the message)
BAD = [
    # the command itself
    ([], "required: COMMAND"),
    (["frobnicate"], "invalid choice"),
    # train: counts, choices, values, device, data, checkpoints, outputs
    ([*TRAIN, "--epochs", "0"], "epochs must be >= 1"),
    ([*TRAIN, "--batch-size", "-4"], "batch_size must be >= 1"),
    ([*TRAIN, "--sampler-steps", "0"], "sampler_steps must be >= 1"),
    ([*TRAIN, "--sampler-steps", "100000000"], "sampler_steps must be <= 1,000,000 (the seed uses"),
    ([*TRAIN, "--buffer-size", "100000000"], "buffer_size must be <= 16,777,216 (images held"),
    ([*TRAIN, "--epochs", "10000000"], "epochs must be <= 1,000,000"),
    ([*TRAIN, "--gen-steps", "10000000"], "gen_steps must be <="),
    ([*TRAIN, "--lr", "-1"], "lr must be > 0"),
    ([*TRAIN, "--epochs", "many"], "invalid int value"),
    ([*TRAIN, "--preset", "fast"], "invalid choice"),
    ([*TRAIN, "--sampler-backend", "turbo"], "invalid choice"),
    ([*TRAIN, "--data", "cifar"], "invalid choice"),
    ([*TRAIN, "--set", "nope=1"], "unknown TrainConfig field"),
    ([*TRAIN, "--threads", "0"], "--threads"),
    ([*TRAIN, "--quality-every", "-1"], "--quality-every"),
    ([*TRAIN, "--sampler-backend", "graph"], "graph"),
    (["train", "--out", "OUT", "--device", "tpu"], "device must be"),
    pytest.param(["train", "--out", "OUT", "--device", "cuda"], "no CUDA device", marks=NO_CUDA),
    ([*TRAIN, "--data", "mnist", "--data-root", "MISSING"], "MNIST not found"),
    ([*TRAIN, "--resume", "MISSING"], "no checkpoint at"),
    ([*TRAIN, "--resume", "FOREIGN"], "not an ebmfast checkpoint"),
    (["train", "--device", "cpu", "--out", "FILE"], "exists and is not a folder"),
    (["train", "--device", "cpu", "--out", "/proc/ebmfast-run"], "cannot write in /proc"),
    # sample
    ([*SAMPLE, "--n", "0"], "--n must be in"),
    ([*SAMPLE, "--steps", "-1"], "--steps must be in"),
    ([*SAMPLE, "--steps", "100000000"], "--steps must be in [1, 1,000,000] (the seed uses 256"),
    ([*SAMPLE, "--seed", "-1"], "--seed must be in"),
    ([*SAMPLE, "--nrow", "0"], "--nrow"),
    ([*SAMPLE, "--backend", "turbo"], "invalid choice"),
    ([*SAMPLE, "--backend", "graph"], "graph"),
    pytest.param(["sample", "--checkpoint", CKPT, "--device", "cuda"], "no CUDA device", marks=NO_CUDA),
    (["sample", "--out", "OUT/grid.png"], "required: --checkpoint"),
    (["sample", "--checkpoint", "MISSING", "--out", "OUT/grid.png"], "no checkpoint at"),
    (["sample", "--checkpoint", "FOREIGN", "--out", "OUT/grid.png"], "not an ebmfast checkpoint"),
    (["sample", "--checkpoint", CKPT, "--out", "/proc/x.png"], "cannot write in /proc"),
    (["sample", "--checkpoint", CKPT, "--out", "OUT/grid.txt"], ".png"),
    (["sample", "--checkpoint", CKPT, "--out", "FILE/grid.png"], "is not a folder"),
    # evaluate
    ([*EVALUATE, "--n-samples", "1"], "--n-samples must be >= 2"),
    ([*EVALUATE, "--n-samples", "5000"], "too large"),
    ([*EVALUATE, "--steps", "0"], "--steps must be in"),
    ([*EVALUATE, "--steps", "100000000"], "--steps must be in"),
    ([*EVALUATE, "--classifier-epochs", "100000"], "--classifier-epochs must be in"),
    ([*EVALUATE, "--n-ood", "10000000000"], "--n-ood must be in"),
    ([*EVALUATE, "--n-ood", "-5"], "--n-ood must be in"),
    ([*EVALUATE, "--classifier-epochs", "0"], "--classifier-epochs"),
    ([*EVALUATE, "--seed", "-1"], "--seed"),
    ([*EVALUATE, "--data", "cifar"], "invalid choice"),
    ([*EVALUATE, "--backend", "graph"], "graph"),
    ([*EVALUATE, "--data", "mnist", "--data-root", "MISSING"], "MNIST not found"),
    pytest.param(["evaluate", "--checkpoint", CKPT, "--device", "cuda"], "no CUDA device", marks=NO_CUDA),
    (["evaluate", "--checkpoint", "MISSING", "--out", "OUT"], "no file at"),
    (["evaluate", "--checkpoint", "FOREIGN", "--out", "OUT"], "not an ebmfast checkpoint"),
    (["evaluate", "--checkpoint", CKPT, "--out", "/proc/report"], "cannot write in /proc"),
    (["evaluate", "--checkpoint", CKPT, "--out", "FILE"], "exists and is not a folder"),
    # names longer than the file system allows (issue 22: OSError [Errno 36] tracebacks)
    (["sample", "--checkpoint", CKPT, "--out", "OUT/" + "n" * 300 + ".png"], "is 304 bytes long"),
    (["train", "--device", "cpu", "--out", "OUT/" + "n" * 300], "is 300 bytes long"),
    (["evaluate", "--checkpoint", CKPT, "--out", "OUT/" + "n" * 300], "is 300 bytes long"),
    (["bench", "--device", "cpu", "--json", "OUT/" + "n" * 300 + ".json"], "is 305 bytes long"),
    # output files never replace another kind of file (issue 22: the checkpoint became a classifier cache)
    (["evaluate", "--checkpoint", "MODEL", "--out", "OUT", "--classifier", "MODEL"], "is not an ebmfast classifier"),
    ([*EVALUATE, "--classifier", "FOREIGN"], "is not an ebmfast classifier cache (another torch file)"),
    ([*EVALUATE, "--classifier", "FILE"], "is not an ebmfast classifier cache (not a torch file)"),
    (["sample", "--checkpoint", CKPT, "--out", "MODEL_PNG"], "holds a torch file"),
    (["train", "--device", "cpu", "--quality-every", "1", "--out", "RUN"], "is not an ebmfast classifier cache"),
    # bench
    ([*BENCH, "--batch", "0"], "--batch values must be positive"),
    ([*BENCH, "--steps", "-2"], "--steps values must be positive"),
    ([*BENCH, "--rounds", "0"], "--rounds"),
    ([*BENCH, "--train-iters", "0"], "--train-iters"),
    ([*BENCH, "--train-batch", "0"], "--train-batch"),
    ([*BENCH, "--hidden-features", "3"], "--hidden-features must be an even integer"),
    ([*BENCH, "--steps", "100000000"], "--steps must be <= 1,000,000"),
    ([*BENCH, "--batch", "100000000"], "--batch must be <= 1,048,576"),
    ([*BENCH, "--rounds", "100000000"], "--rounds must be <= 10,000"),
    ([*BENCH, "--backends", "turbo"], "backend must be one of"),
    ([*BENCH, "--backends", "graph"], "not available on cpu"),
    ([*BENCH, "--precision", "fp8"], "invalid choice"),
    (["bench", "--device", "tpu"], "invalid choice"),
    pytest.param(["bench", "--device", "cuda"], "no CUDA device", marks=NO_CUDA),
    (["bench", "--device", "cpu", "--json", "/proc/b.json"], "cannot write in /proc"),
    (["bench", "--device", "cpu", "--csv", "/proc/b.csv"], "cannot write in /proc"),
    (["bench", "--device", "cpu", "--csv", "OTHER_CSV"], "expected"),
]


def _argv(argv, paths):
    out = []
    for a in argv:
        head, sep, tail = a.partition("/")
        out.append(str(paths[head] / tail) if head in paths and sep else str(paths.get(a, a)))
    return out


def _digests(paths) -> dict:
    return {k: hashlib.sha256(p.read_bytes()).hexdigest() for k, p in paths.items() if p.is_file()}


@pytest.mark.parametrize("argv, message", BAD, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_invocation_exits_2_with_one_line(argv, message, paths, capsys):
    before = _digests(paths)
    try:
        rc = main(_argv(argv, paths))
    except SystemExit as exc:  # argparse
        rc = exc.code
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert rc == 2, captured.err
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{captured.err}"
    assert "Traceback" not in captured.err
    assert message in lines[0], lines[0]
    assert lines[0].startswith("ebmfast"), lines[0]
    assert not paths["OUT"].exists(), "a refused command wrote output"
    assert _digests(paths) == before, "a refused command changed an existing file"


def test_bad_invocation_in_a_real_process():
    """What a shell sees from ``python -m ebmfast``: exit code 2, one line on stderr, nothing on stdout."""
    argv = ["sample", "--checkpoint", CKPT, "--out", "/proc/x.png", "--device", "cpu"]
    res = subprocess.run([sys.executable, "-m", "ebmfast", *argv], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stderr.splitlines() == [f"ebmfast sample: error: --out /proc/x.png: cannot write in /proc ({_ENOENT})"]
    assert res.stdout == ""


@pytest.mark.slow
def test_file_size_limit_while_saving_is_one_line(tmp_path):
    """Issue 22: ``ulimit -f`` below the checkpoint's size gave an ``OSError: [Errno 27] File too large`` traceback."""
    import resource

    out = tmp_path / "fz"
    argv = ["train", "--preset", "quick", "--device", "cpu", "--out", str(out), "--max-iterations", "1"]
    argv += ["--hidden", "8", "--batch-size", "16", "--sampler-steps", "2", "--sampler-backend", "eager"]
    argv += ["--sample-every", "0", "--no-tensorboard", "--quiet", "--threads", "1"]  # buffer 8192: a 26 MB file

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000 * 1024, 20_000 * 1024))  # ulimit -f 20000

    res = subprocess.run(
        [sys.executable, "-m", "ebmfast", *argv], capture_output=True, text=True, timeout=300, preexec_fn=limit
    )
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines[-1].startswith(f"ebmfast train: error: cannot write checkpoint {out}"), res.stderr
    assert "file too large" in lines[-1] and "Traceback" not in res.stderr
    assert not list((out / "checkpoints").glob("*"))  # no torn file, no temporary file left
