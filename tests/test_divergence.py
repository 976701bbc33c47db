"""Divergence: detection rules, snapshots, and recovery of a real (tiny) run from injected divergences."""

import math

import pytest
import torch
from train_helpers import one_thread, small_data, tiny_config  # noqa: F401

from ebmfast.errors import DivergenceError
from ebmfast.training.divergence import DivergenceMonitor, SnapshotRing
from ebmfast.training.runlog import read_metrics
from ebmfast.training.state import derive_seed
from ebmfast.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

HEALTHY = {"loss": 0.1, "metrics_avg_real": 0.5, "metrics_avg_fake": 0.4}


# ------------------------------------------------------------------------------------------- detection rules
@pytest.mark.parametrize("key", ["loss", "metrics_avg_real", "metrics_avg_fake", "grad_norm"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_is_detected(key, bad):
    ev = DivergenceMonitor().check_step(7, {**HEALTHY, key: bad})
    assert ev is not None and ev.reason == "non_finite" and key in ev.detail and "iteration 7" in ev.detail


def test_energy_explosion_is_detected():
    mon = DivergenceMonitor(energy_limit=100.0)
    assert mon.check_step(1, {**HEALTHY, "metrics_avg_real": 99.0}) is None
    ev = mon.check_step(2, {**HEALTHY, "metrics_avg_fake": -150.0})
    assert ev.reason == "energy_explosion" and "150" in ev.detail and "energy_limit 100" in ev.detail


def _feed(mon, triples, start=0):
    """Feed (real, fake, noise) per check; return the first event and its index."""
    for i, (real, fake, noise) in enumerate(triples):
        ev = mon.check_step(
            (start + i + 1) * mon.check_every,
            {"loss": 0.0, "metrics_avg_real": real, "metrics_avg_fake": fake},
            noise_out=lambda noise=noise: noise,
        )
        if ev is not None:
            return ev, i
    return None, None


def test_gap_collapse_data_no_longer_beats_noise():
    mon = DivergenceMonitor(check_every=10, patience=3, ratio=0.2, min_gap=1.0)
    learning = [(0.0, -0.1, -g) for g in (0.5, 1.0, 2.0, 4.0, 5.0)]  # gap grows to 5: armed
    collapsed = [(0.0, -0.1, -0.5)] * 5  # gap 0.5 < 0.2 * 5
    ev, i = _feed(mon, learning + collapsed)
    assert ev.reason == "gap_collapse" and "no longer tells data from noise" in ev.detail
    assert i == len(learning) + 2  # the third failing check in a row


def test_gap_collapse_samples_score_like_noise():
    mon = DivergenceMonitor(check_every=10, patience=2, ratio=0.2, min_gap=1.0)
    ev, i = _feed(mon, [(0.0, -0.1, -3.0)] * 3 + [(0.0, -2.9, -3.0)] * 3)
    assert ev.reason == "gap_collapse" and "samples score like noise" in ev.detail and i == 4


def test_gap_checks_need_patience_and_arming():
    mon = DivergenceMonitor(check_every=10, patience=3, ratio=0.2, min_gap=1.0)
    # not armed: the gap never reached min_gap, so tiny gaps and noise-like samples are fine (early training)
    assert _feed(mon, [(0.0, -0.3, -0.3)] * 10) == (None, None)
    mon = DivergenceMonitor(check_every=10, patience=3, ratio=0.2, min_gap=1.0)
    # armed, but failures are never 3 in a row
    trace = [(0.0, -0.1, -5.0)] + [(0.0, -0.1, -0.1), (0.0, -0.1, -0.1), (0.0, -0.1, -5.0)] * 4
    assert _feed(mon, trace) == (None, None)
    # only every check_every-th iteration computes f(noise)
    calls = []
    mon.check_step(11, HEALTHY, noise_out=lambda: calls.append(1) or -1.0)
    assert calls == []


def test_epoch_check_and_argument_errors():
    mon = DivergenceMonitor()
    assert mon.check_epoch(3, {"val_real_out": 0.1}) is None
    assert mon.check_epoch(3, {"val_real_out": math.nan}).reason == "non_finite"
    with pytest.raises(ValueError, match="energy_limit"):
        DivergenceMonitor(energy_limit=0)
    with pytest.raises(ValueError, match="patience"):
        DivergenceMonitor(patience=0)
    with pytest.raises(ValueError, match="ratio"):
        DivergenceMonitor(ratio=1.0)


def test_snapshot_ring_falls_back_to_older_snapshot():
    ring = SnapshotRing(keep=2)
    with pytest.raises(DivergenceError):
        ring.rollback_target()
    t = torch.zeros(3)
    ring.take(10, {"x": t})
    t.fill_(1.0)  # snapshots are copies
    ring.take(20, {"x": t})
    it, state = ring.rollback_target()
    assert it == 20 and state["x"].tolist() == [1.0, 1.0, 1.0]
    it, state = ring.rollback_target()  # the roll-back to 20 failed again: use the older one
    assert it == 10 and state["x"].tolist() == [0.0, 0.0, 0.0]
    ring.take(30, {"x": t})
    assert ring.rollback_target()[0] == 30


def test_derive_seed_distinct():
    seeds = {derive_seed(42, a, s) for a in range(5) for s in range(6)}
    assert len(seeds) == 30 and all(0 <= s < 2**62 for s in seeds)


# ------------------------------------------------------------------------------------------ recovery in runs
class Inject:
    """Test hook: at iteration ``at`` (once, or every time when ``always``) break the run."""

    def __init__(self, at, what, always=False):
        self.at, self.what, self.always, self.fired = at, what, always, 0

    def on_step_end(self, trainer, iteration, metrics):
        if iteration == self.at and (self.always or not self.fired):
            self.fired += 1
            if self.what == "nan":
                with torch.no_grad():
                    next(trainer.model.parameters()).fill_(float("nan"))
            elif self.what == "lr_spike":
                for g in trainer.optimizer.param_groups:
                    g["lr"] = 50.0
        return None


def _fit(tmp_path, inject, **kw):
    cfg = tiny_config(epochs=2, snapshot_every=4, sample_every=0, **kw)
    tr = Trainer(cfg, data=small_data(), device="cpu", out_dir=tmp_path, callbacks=[inject], progress=False)
    try:
        return tr, tr.fit()
    finally:
        tr.close()


@pytest.mark.slow
@pytest.mark.parametrize("what, reasons", [("nan", {"non_finite"}), ("lr_spike", {"non_finite", "energy_explosion"})])
def test_run_recovers_from_injected_divergence(tmp_path, what, reasons):
    inject = Inject(at=5, what=what)
    tr, result = _fit(tmp_path, inject)
    assert inject.fired == 1
    assert result.status == "completed" and result.epoch == 2 and result.recoveries == 1
    assert len(tr.events) == 1 and tr.events[0]["reason"] in reasons
    assert all(bool(torch.isfinite(p).all()) for p in tr.model.parameters())
    # rolled back to the snapshot at iteration 4, reseeded, lr halved (and the spike did not survive)
    assert tr.lr_scale == 0.5
    assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 * 0.5 * 0.97**2)
    assert tr.sampler.seed == derive_seed(tr.config.seed, 1, 2)
    metrics = read_metrics(tmp_path / "metrics.csv")
    assert [v for _, v in metrics["divergence/rollback_to"]] == [4.0]
    assert len(metrics["divergence/event"]) == 1
    log = (tmp_path / "train.log").read_text()
    assert "divergence detected" in log and "rolled back to iteration 4" in log
    # the run still completed its 20 iterations after the roll-back; the final checkpoint is finite and usable
    assert result.iteration == 20
    from ebmfast.training.checkpoint import load_model

    load_model(tmp_path / "checkpoints" / "last.pt")


@pytest.mark.slow
def test_bounded_retries_then_a_clear_error(tmp_path):
    inject = Inject(at=6, what="nan", always=True)
    with pytest.raises(DivergenceError, match=r"diverged 3 times \(max_recoveries=2\)"):
        _fit(tmp_path, inject, max_recoveries=2)
    assert inject.fired == 3
    assert "giving up" in (tmp_path / "train.log").read_text()


@pytest.mark.slow
def test_gap_collapse_triggers_recovery_in_a_run(tmp_path):
    """The trainer's wiring of the gap check: f(noise) is stubbed to first look learnt (gap ~ 10), then to score like
    data; after ``patience`` failing checks the run rolls back, then finishes."""
    cfg = tiny_config(epochs=2, snapshot_every=4, sample_every=0, collapse_check_every=2, collapse_patience=2)
    tr = Trainer(cfg, data=small_data(), device="cpu", out_dir=None, progress=False)
    calls = []

    def fake_noise_out():
        calls.append(tr.iteration)
        if len(calls) <= 2 or len(calls) > 4:
            return -10.0  # data far above noise
        return 10.0  # noise scores above data: collapsed

    tr._noise_out = fake_noise_out
    result = tr.fit()
    assert result.status == "completed" and result.recoveries == 1
    assert tr.events[0]["reason"] == "gap_collapse" and tr.events[0]["iteration"] == 8
    assert calls[:4] == [2, 4, 6, 8]


@pytest.mark.slow
def test_divergence_check_can_be_turned_off(tmp_path):
    inject = Inject(at=5, what="nan")
    tr, result = _fit(tmp_path, inject, divergence_check=False)
    assert result.recoveries == 0
    assert not all(bool(torch.isfinite(p).all()) for p in tr.model.parameters())


class PoisonAfter:
    """Wraps the trainer's iteration runner: right after the ``at``-th iteration (inside the loop, before any flush)
    the weights become NaN, so the next iteration's loss is NaN and its update is skipped on the device."""

    def __init__(self, trainer, at):
        self.inner, self.trainer, self.at, self.calls = trainer.runner, trainer, at, 0

    def __call__(self, real):
        out = self.inner(real)
        self.calls += 1
        if self.calls == self.at:
            with torch.no_grad():
                next(self.trainer.model.parameters()).fill_(float("nan"))
        return out

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.slow
@pytest.mark.parametrize("sync_every", [1, 3])
def test_detection_waits_for_the_flush_and_rolls_back_the_same_way(tmp_path, sync_every):
    """Weights poisoned after iteration 6: iteration 7 is non-finite (its update skipped on the device). With
    sync_every=1 that is seen at once; with 3 at the flush after iteration 8 (flushes: 1, 3, 4 = snapshot, 6,
    8 = snapshot), which drops iteration 8. Either way the event names iteration 7 and the run rolls back to the
    snapshot at 4, then completes."""
    cfg = tiny_config(epochs=2, snapshot_every=4, sample_every=0, sync_every=sync_every)
    tr = Trainer(cfg, data=small_data(), device="cpu", out_dir=tmp_path, progress=False)
    tr.runner = PoisonAfter(tr, at=6)
    result = tr.fit()
    tr.close()
    assert result.status == "completed" and result.recoveries == 1 and result.iteration == 20
    assert tr.events[0]["reason"] == "non_finite" and "iteration 7" in tr.events[0]["detail"]
    assert tr.events[0]["iteration"] == (7 if sync_every == 1 else 8)  # where the trainer was when it saw it
    metrics = read_metrics(tmp_path / "metrics.csv")
    assert [v for _, v in metrics["divergence/rollback_to"]] == [4.0]
    assert metrics["update_skipped"] == [(7, 1.0)]
    losses = [step for step, _ in metrics["loss"]]
    assert losses == [1, 2, 3, 4, 5, 6, 7] + list(range(5, 21))  # iteration 8 (sync_every=3) was dropped, not logged
    log = (tmp_path / "train.log").read_text()
    assert ("the 1 iteration(s) after it are dropped" in log) == (sync_every == 3)
    assert all(bool(torch.isfinite(p).all()) for p in tr.model.parameters())


@pytest.mark.slow
def test_a_tensor_lr_is_written_in_place_through_schedule_rollback_and_resume(tmp_path, monkeypatch):
    """What the CUDA iteration graph needs from the trainer, checked on the CPU: with the lr in a tensor (on CUDA a
    device tensor the graph reads; here float64 so the arithmetic equals a float lr's), the epoch schedule, the
    roll-back's lr halving and a resume all write that same tensor in place, and the run equals the float-lr run."""
    import ebmfast.training.trainer as trainer_mod

    def tensor_lr_adam(params, config, device):
        lr = torch.tensor(float(config.lr), dtype=torch.float64)
        return torch.optim.Adam(params, lr=lr, betas=config.betas, foreach=False)

    def run(out, max_iterations, resume=None):
        cfg = tiny_config(epochs=2, snapshot_every=4, sample_every=0, max_iterations=max_iterations)
        tr = Trainer(cfg, data=small_data(), device="cpu", out_dir=out, resume=resume, progress=False)
        if resume is None:
            tr.runner = PoisonAfter(tr, at=5)
        result = tr.fit()
        tr.close()
        return tr, result

    plain, p_result = run(tmp_path / "plain", 17)
    monkeypatch.setattr(trainer_mod, "build_optimizer", tensor_lr_adam)
    tensor, t_result = run(tmp_path / "tensor", 17)
    lr = tensor.optimizer.param_groups[0]["lr"]
    assert lr is tensor._lr_tensors[0] and float(lr) == 1e-4 * 0.5 * 0.97  # rolled back once, one epoch end
    assert t_result.recoveries == p_result.recoveries == 1
    assert all(torch.equal(a, b) for a, b in zip(plain.model.parameters(), tensor.model.parameters()))
    assert torch.equal(plain.buffer.storage, tensor.buffer.storage) and t_result.metrics == p_result.metrics
    # resume the tensor-lr run's checkpoint (written at 17): its lr comes back into the new run's own tensor
    resumed, _ = run(tmp_path / "tensor", 19, resume=tmp_path / "tensor" / "checkpoints" / "last.pt")
    lr = resumed.optimizer.param_groups[0]["lr"]
    assert lr is resumed._lr_tensors[0] and float(lr) == 1e-4 * 0.5 * 0.97
