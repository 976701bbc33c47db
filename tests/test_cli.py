"""The ``ebmfast train`` and ``ebmfast sample`` commands: smoke runs in-process, one real subprocess, exit codes."""

import subprocess
import sys

import pytest
import torch
from PIL import Image
from train_helpers import TINY_CLI, one_thread  # noqa: F401

from ebmfast.cli import main
from ebmfast.training.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def test_python_m_ebmfast_help():
    res = subprocess.run([sys.executable, "-m", "ebmfast", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for cmd in ("train", "sample", "evaluate", "bench"):
        assert cmd in res.stdout


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One tiny ``ebmfast train`` (6 iterations, then a resume to 9) shared by the tests below."""
    out = tmp_path_factory.mktemp("cli") / "run"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = main(["train", "--preset", "quick", "--out", str(out), "--max-iterations", "6", *TINY_CLI])
        assert rc == 0
        rc2 = main(["train", "--resume", str(out / "checkpoints" / "last.pt"), "--max-iterations", "9", "--quiet"])
    finally:
        torch.set_num_threads(n)
    return out, rc2


def test_train_smoke_and_resume(cli_run):
    out, rc2 = cli_run
    assert rc2 == 0
    for rel in ("config.json", "metrics.csv", "train.log", "checkpoints/last.pt"):
        assert (out / rel).is_file(), rel
    assert list((out / "samples").glob("generation_epoch*.png"))
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt["trainer"]["iteration"] == 9
    assert ckpt["config"]["hidden_features"] == 8 and ckpt["config"]["max_iterations"] == 9
    steps = [int(line.split(",")[0]) for line in (out / "metrics.csv").read_text().splitlines()[1:] if ",loss," in line]
    assert steps == list(range(1, 10))  # the resumed run appended iterations 7..9
    assert "resumed from" in (out / "train.log").read_text()


def test_sample_writes_a_grid(cli_run, tmp_path, capsys):
    out, _ = cli_run
    png = tmp_path / "grid.png"
    rc = main(
        [
            "sample",
            "--checkpoint",
            str(out / "checkpoints" / "last.pt"),
            "--n",
            "6",
            "--steps",
            "3",
            "--out",
            str(png),
            "--backend",
            "eager",
            "--device",
            "cpu",
            "--nrow",
            "3",
        ]
    )
    assert rc == 0
    assert Image.open(png).size == (2 + 3 * 30, 2 + 2 * 30)
    assert "wrote" in capsys.readouterr().out


def _rc(argv, capsys):
    """main's exit code (argparse's own errors raise SystemExit) and stderr."""
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    return rc, capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--epochs", "0"], "epochs must be >= 1"),
        (["--lr", "-1"], "lr must be > 0"),
        (["--lr", "nan"], "lr must be finite"),
        (["--batch-size", "0"], "batch_size must be >= 1"),
        (["--hidden", "7"], "hidden_features must be even"),
        (["--set", "nope=1"], "unknown TrainConfig field"),
        (["--set", "lr=abc"], "cannot read 'abc'"),
        (["--set", "lr"], "KEY=VALUE"),
        (["--sampler-backend", "graph", "--device", "cpu"], "graph"),
        (["--device", "tpu"], "device must be"),
        (["--quality-every", "-1"], "quality-every"),
        (["--resume", "/nonexistent/last.pt"], "no checkpoint at"),
        (["--data", "mnist", "--data-root", "/nonexistent"], "MNIST not found"),
        (["--epochs", "abc"], "invalid int value"),
        (["--preset", "fast"], "invalid choice"),
    ],
)
def test_train_bad_values_exit_2_and_write_nothing(flags, message, tmp_path, capsys):
    out = tmp_path / "out"
    rc, err = _rc(["train", "--out", str(out), *flags], capsys)
    assert rc == 2
    assert message in err
    assert not out.exists()


def test_train_without_cuda_device_exits_2(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rc, err = _rc(["train", "--out", str(tmp_path / "o"), "--device", "cuda"], capsys)
    assert rc == 2 and "CUDA" in err


def test_quality_every_without_quality_module_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ebmfast.evaluation.quality", None)  # as if quality.py did not exist
    rc, err = _rc(["train", "--out", str(tmp_path / "o"), "--quality-every", "2"], capsys)
    assert rc == 2 and "ebmfast.evaluation.quality" in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--n", "0"], "--n must be in"),
        (["--steps", "0"], "--steps must be in"),
        (["--out", "grid.txt"], ".png"),
        (["--nrow", "0"], "--nrow"),
        (["--backend", "graph", "--device", "cpu"], "graph"),
    ],
)
def test_sample_bad_values_exit_2(flags, message, cli_run, tmp_path, capsys):
    out, _ = cli_run
    argv = ["sample", "--checkpoint", str(out / "checkpoints" / "last.pt"), "--out", str(tmp_path / "g.png"), *flags]
    if "--out" in flags:
        argv = ["sample", "--checkpoint", str(out / "checkpoints" / "last.pt"), *flags]
    rc, err = _rc(argv, capsys)
    assert rc == 2 and message in err
    assert not (tmp_path / "g.png").exists()


def test_sample_bad_checkpoint_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    rc, err = _rc(["sample", "--checkpoint", str(bad), "--out", str(tmp_path / "g.png")], capsys)
    assert rc == 2 and "not an ebmfast checkpoint" in err


def test_train_refuses_to_overwrite_a_run(cli_run, capsys):
    out, _ = cli_run
    rc, err = _rc(["train", "--out", str(out), *TINY_CLI], capsys)
    assert rc == 2 and "--resume" in err
