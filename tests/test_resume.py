"""Exact resume: a run stopped mid-epoch and resumed ends bit-identical to an uninterrupted run; SIGINT/SIGTERM save
a resumable checkpoint and say how to resume."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from train_helpers import TINY_CLI, one_thread, small_data, tiny_config  # noqa: F401

from ebmfast.cli import main
from ebmfast.training.checkpoint import load_checkpoint
from ebmfast.training.trainer import Trainer

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # every test here trains

# 160 images / batch 16 = 10 iterations per epoch: stop at 7 (mid-epoch), compare at 17 (in the next epoch, after an
# epoch end with validation, rand_out, grids, StepLR, checkpoints and snapshots). Snapshots every 4 iterations.
CFG = dict(epochs=3, snapshot_every=4, collapse_check_every=2)


def _run(out, max_iterations, resume=None, **kw):
    tr = Trainer(
        tiny_config(**CFG, max_iterations=max_iterations, **kw),
        data=small_data(),
        device="cpu",
        out_dir=out,
        resume=resume,
        progress=False,
    )
    result = tr.fit()
    tr.close()
    return tr, result


def _same_state(a: Trainer, b: Trainer) -> list[str]:
    diffs = [n for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()) if not torch.equal(p, q)]
    if not torch.equal(a.buffer.storage, b.buffer.storage):
        diffs.append("buffer")
    for i, (sa, sb) in enumerate(zip(a.optimizer.state.values(), b.optimizer.state.values())):
        if not all(torch.equal(sa[k], sb[k]) for k in ("exp_avg", "exp_avg_sq")):
            diffs.append(f"adam state {i}")
    if a.sampler.state_dict() != b.sampler.state_dict():
        diffs.append("sampler")
    return diffs


def test_resume_mid_epoch_is_bit_identical(tmp_path):
    full, r_full = _run(tmp_path / "full", 17)
    part, r_part = _run(tmp_path / "part", 7)
    assert r_part.status == "max_iterations" and r_part.iteration == 7 and r_part.epoch == 0
    torch.manual_seed(987)  # the resumed run must not depend on the global RNG state it starts with
    resumed, r_res = _run(tmp_path / "part", 17, resume=tmp_path / "part" / "checkpoints" / "last.pt")
    assert r_full.iteration == r_res.iteration == 17 and r_full.epoch == r_res.epoch == 1
    assert _same_state(full, resumed) == []
    assert r_full.metrics == r_res.metrics  # the final validation / rand_out report

    # Control: the comparison can fail. Resuming with the sampler's noise stream moved on gives other parameters.
    ckpt = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")
    ckpt["trainer"]["sampler"]["counters"] = {k: v + 1 for k, v in ckpt["trainer"]["sampler"]["counters"].items()}
    from ebmfast.training.checkpoint import save_checkpoint

    bad_path = tmp_path / "bad" / "checkpoints" / "last.pt"
    save_checkpoint(bad_path, {k: v for k, v in ckpt.items() if k not in ("format", "format_version")})
    other, _ = _run(tmp_path / "bad", 17, resume=bad_path)
    assert _same_state(full, other) != []


def test_resume_with_deferred_metrics_is_bit_identical(tmp_path):
    """With metrics copied to the host every 3 iterations (flushes at other iterations than an uninterrupted
    sync_every=1 run), stopping at 7 and resuming to 17 still ends in the same state: a stop flushes first, and
    nothing that changes the training state depends on where flushes fall."""
    full, r_full = _run(tmp_path / "full", 17)
    part, r_part = _run(tmp_path / "part", 7, sync_every=3)
    assert r_part.status == "max_iterations" and r_part.iteration == 7
    resumed, r_res = _run(tmp_path / "part", 17, resume=tmp_path / "part" / "checkpoints" / "last.pt", sync_every=3)
    assert r_res.iteration == 17
    assert _same_state(full, resumed) == []
    assert r_full.metrics == r_res.metrics


def _wait_for_steps(path, n, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"training exited early with rc {proc.returncode}: {proc.stdout.read()}")
        if path.exists() and path.read_text().count(",loss,") >= n:
            return
        time.sleep(0.1)
    raise AssertionError(f"no {n} training steps in {path} after {timeout} s")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_resumable_checkpoint(sig, tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "ebmfast",
        "train",
        "--preset",
        "quick",
        "--out",
        str(out),
        "--epochs",
        "1000",
        "--set",
        "snapshot_every=1000",
        *TINY_CLI,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        _wait_for_steps(out / "metrics.csv", 3, proc)
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    last = out / "checkpoints" / "last.pt"
    assert proc.returncode == 128 + sig, output
    assert f"Resume with: ebmfast train --resume {last}" in output
    assert "Traceback" not in output
    stopped_at = load_checkpoint(last)["trainer"]["iteration"]
    assert stopped_at >= 3

    # resume two more iterations; an uninterrupted run to the same iteration ends with the same parameters
    target = stopped_at + 2
    assert main(["train", "--resume", str(last), "--max-iterations", str(target), "--quiet"]) == 0
    ref = tmp_path / "ref"
    assert (
        main(
            [
                "train",
                "--preset",
                "quick",
                "--out",
                str(ref),
                "--epochs",
                "1000",
                "--max-iterations",
                str(target),
                "--set",
                "snapshot_every=1000",
                *TINY_CLI,
            ]
        )
        == 0
    )
    a = load_checkpoint(last)
    b = load_checkpoint(ref / "checkpoints" / "last.pt")
    assert a["trainer"]["iteration"] == b["trainer"]["iteration"] == target
    for name, p in a["model"]["state_dict"].items():
        assert torch.equal(p, b["model"]["state_dict"][name]), name
    assert torch.equal(a["trainer"]["buffer"]["storage"], b["trainer"]["buffer"]["storage"])


def test_stop_inside_a_long_chain_saves_and_resumes_exactly(tmp_path):
    """A stop asked for in the middle of an iteration's chain (chains longer than chunk_steps look at the flag between
    chunks) abandons that iteration and puts back what it consumed: the resumed run equals an uninterrupted one."""
    full, _ = _run(tmp_path / "full", 5, sampler_steps=30)
    tr = Trainer(
        tiny_config(**CFG, sampler_steps=30, max_iterations=5),
        data=small_data(),
        device="cpu",
        out_dir=tmp_path / "part",
        progress=False,
    )
    tr.sampler.chunk_steps = 10
    looks = []

    def stop_in_third_iteration():
        looks.append(tr.iteration)
        if len(looks) == 8:  # iterations 1 and 2 look 3 times each; the third's second look sees the stop
            tr.request_stop(signal.SIGTERM)
        return tr.signals.signum is not None

    tr.sampler.stop_check = stop_in_third_iteration
    result = tr.fit()
    tr.close()
    assert result.status == "interrupted" and result.iteration == 2, result
    assert looks[-1] == 2
    resumed, r_res = _run(tmp_path / "part", 5, resume=result.last_checkpoint, sampler_steps=30)
    assert r_res.iteration == 5
    assert _same_state(full, resumed) == []


@pytest.mark.parametrize("signals", [1, 2], ids=["one signal", "two signals"])
def test_sigterm_stops_a_chain_of_a_million_steps(signals, tmp_path):
    """Issue 22: one SIGTERM during the first iteration of a very long chain used to wait for the whole chain. Now
    the chain stops at its next chunk boundary and a resumable checkpoint of iteration 0 is saved (exit 143); a
    second signal ends at once (exit 130)."""
    out = tmp_path / "run"
    flags = TINY_CLI[: TINY_CLI.index("--sampler-steps")] + TINY_CLI[TINY_CLI.index("--sampler-steps") + 2 :]
    cmd = [sys.executable, "-m", "ebmfast", "train", "--preset", "quick", "--out", str(out), *flags]
    cmd += ["--max-iterations", "1", "--sampler-steps", "1000000"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        t0 = time.time()
        while not (out / "train.log").exists() or "iterations:" not in (out / "train.log").read_text():
            assert proc.poll() is None and time.time() - t0 < 120, "training did not start"
            time.sleep(0.1)
        time.sleep(1.0)  # inside the first iteration's chain
        for _ in range(signals):
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in output
    if signals == 1:
        assert proc.returncode == 128 + signal.SIGTERM, output
        assert load_checkpoint(out / "checkpoints" / "last.pt")["trainer"]["iteration"] == 0
    else:
        assert proc.returncode == 130, output
        assert "interrupted" in output


def test_checkpoint_before_the_first_epoch_ends_and_fresh_metrics(tmp_path):
    """Issue 22: a kill -9 before the first epoch end left no checkpoint; a new run in a folder with a killed run's
    metrics.csv appended to it. Now last.pt is written mid-epoch every checkpoint_every_s seconds (0 here: at every
    flush), and a new run starts metrics.csv afresh."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.csv").write_text("step,epoch,metric,value,wall_time\n1,0,loss,9.0,0\n2,0,loss,9.0,0\n")
    tr = Trainer(tiny_config(**CFG, max_iterations=3), data=small_data(), device="cpu", out_dir=out, progress=False)
    tr.checkpoint_every_s = 0.0
    saved = []

    class SeesLastCheckpoint:  # step hooks run at a flush, before that flush's save
        def on_step_end(self, trainer, iteration, metrics):
            if iteration > 1:
                saved.append(load_checkpoint(trainer.checkpoint_path("last"))["trainer"]["iteration"])

    tr.callbacks.append(SeesLastCheckpoint())
    tr.fit()
    tr.close()
    assert saved == [1, 2], "last.pt after every flush, before any epoch end"
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0] == "step,epoch,metric,value,wall_time"
    assert not [r for r in rows if ",loss,9.0," in r], "the earlier run's rows were kept"
