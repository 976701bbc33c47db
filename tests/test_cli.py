"""The ``ebmfast train`` and ``ebmfast sample`` commands: smoke runs in-process (real processes: test_cli_errors.py,
test_resume.py)."""

import sys

import pytest
import torch
from grid_checks import assert_honest_grid
from PIL import Image
from train_helpers import TINY_CLI, one_thread  # noqa: F401

from ebmfast.cli import main
from ebmfast.training.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("train", "sample", "evaluate", "bench"):
        assert cmd in out


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


@pytest.mark.slow
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


@pytest.mark.slow
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
    assert_honest_grid(Image.open(png), ncols=3, nrows=2)  # 6 samples, 3 per row, each digit at 84 pixels
    assert "wrote" in capsys.readouterr().out


def _rc(argv, capsys):
    """main's exit code (argparse's own errors raise SystemExit) and stderr."""
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    return rc, capsys.readouterr().err


def test_quality_every_without_quality_module_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ebmfast.evaluation.quality", None)  # as if quality.py did not exist
    rc, err = _rc(["train", "--out", str(tmp_path / "o"), "--quality-every", "2"], capsys)
    assert rc == 2 and "ebmfast.evaluation.quality" in err


@pytest.mark.slow
def test_train_refuses_to_overwrite_a_run(cli_run, capsys):
    out, _ = cli_run
    rc, err = _rc(["train", "--out", str(out), *TINY_CLI], capsys)
    assert rc == 2 and "--resume" in err
