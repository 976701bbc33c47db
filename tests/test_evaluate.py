"""``ebmfast evaluate``: the report files exist and parse, user errors exit with code 2."""

import json
import re

import pytest
import torch

from ebmfast import CNNModel, ReplayBuffer
from ebmfast.cli import main
from ebmfast.data import find_fashion_mnist, load_dataset
from ebmfast.evaluation import report as ev
from ebmfast.evaluation.quality import CLASSIFIER_FILENAME, ClassifierConfig
from ebmfast.training.checkpoint import model_record, save_checkpoint

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL = ["--n-samples", "16", "--steps", "8", "--n-ood", "100", "--classifier-epochs", "1", "--quiet"]
CONFIG = {
    "data": "mnist5k",
    "hidden_features": 8,
    "sampler_step_size": 10.0,
    "sampler_noise_std": 0.005,
    "sampler_grad_clip": 0.03,
}


def write_checkpoint(path, model, config, trainer=None):
    """A training checkpoint as ``ebmfast.training.checkpoint`` writes it."""
    state = {"kind": "train", "config": config}
    if trainer is not None:
        state["trainer"] = trainer
    return save_checkpoint(path, {"model": model_record(model), **state})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    # trainer state as ebmfast.training stores it: provenance and the replay buffer (a small one here)
    buffer = ReplayBuffer((1, 28, 28), capacity=64, generator=torch.Generator().manual_seed(0))
    trainer = {"epoch": 3, "iteration": 105, "buffer": buffer.state_dict(), "epoch_metrics": {"rand_out": -1.5}}
    return write_checkpoint(tmp_path_factory.mktemp("run") / "last.pt", CNNModel(hidden_features=8), CONFIG, trainer)


def check_report(out):
    report = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(images) >= 6, images
    for name in images:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    assert sorted(images) == sorted(report["files"]["images"])
    return report, md


@pytest.mark.slow
def test_cli_writes_a_report_that_parses(ckpt, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--out", str(out), *SMALL]) == 0
    assert capsys.readouterr().out.strip().endswith("report.md")
    report, md = check_report(out)

    assert report["checkpoint"]["sha256"] and report["settings"]["steps"] == 8
    assert report["checkpoint"]["epoch"] == 3 and report["checkpoint"]["iteration"] == 105
    assert "trained for 3 epoch(s), 105 iterations" in md and "rand_out -1.5" in md
    assert report["quality"]["replay_buffer"]["n"] == 16 and "buffer_samples.png" in md
    assert report["generation"]["steps_shown"] == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    sets = report["ood"]["sets"]
    assert {"test", "train", "noise", "test_noisy", "test_flipped", "test_shrunk"} <= set(sets)
    assert all(0.0 <= sets[k]["auroc_vs_test"] <= 1.0 for k in sets if k != "test")
    if find_fashion_mnist() is not None:
        assert "fashion_mnist" in sets
    else:
        assert any("Fashion-MNIST not found" in n for n in report["ood"]["notes"])
    qual = report["quality"]
    assert qual["classifier"]["cache"] == "trained"
    assert (ckpt.parent / CLASSIFIER_FILENAME).is_file()  # cached beside the checkpoint
    assert qual["fd_real_vs_real"] < qual["fd_noise_vs_real"]
    assert len(qual["generated"]["class_fractions"]) == 10
    for key in ("## 1. Generation", "## 2. Out-of-distribution", "## 3. Sample quality", "AUROC"):
        assert key in md

    # a second evaluation of the same checkpoint reuses the classifier
    out2 = tmp_path / "again"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--out", str(out2), *SMALL]) == 0
    report2, _ = check_report(out2)
    assert report2["quality"]["classifier"]["cache"] == "hit"
    assert report2["ood"]["seed_table"] == report["ood"]["seed_table"]  # same seed -> same numbers


@pytest.mark.slow
def test_report_notes_a_missing_fashion_mnist(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "find_fashion_mnist", lambda root=None: None)
    data = load_dataset("mnist5k")
    model = CNNModel(hidden_features=8)
    out = tmp_path / "nofashion"
    report = ev.evaluate_model(
        model,
        CONFIG,
        out,
        data=data,
        n_samples=8,
        steps=4,
        n_ood=50,
        classifier_path=tmp_path / CLASSIFIER_FILENAME,
        classifier_config=ClassifierConfig(epochs=1, max_train_images=300),
    )
    _, md = check_report(out)
    assert "fashion_mnist" not in report["ood"]["sets"]
    assert "Fashion-MNIST not found" in md
    assert report["warnings"], "an untrained model and a 300-image classifier must raise warnings"
    assert report["quality"]["replay_buffer"] is None and "buffer_samples.png" not in md


def test_generation_grid_shows_every_32nd_of_256_steps():
    assert ev.shown_steps(256) == [0, 32, 64, 96, 128, 160, 192, 224, 256]
    assert ev.shown_steps(4) == [0, 1, 2, 3, 4]
