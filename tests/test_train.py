"""Trainer: the seed's training step, a smoke run that separates data from noise, the output layout, callbacks."""

import copy
import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import assert_close_verbose
from grid_checks import assert_honest_grid
from PIL import Image
from recording import TOLERANCE, recorded_here
from train_helpers import one_thread, small_data, tiny_config  # noqa: F401  (one_thread is a fixture)

from ebmfast.data import DataSplits
from ebmfast.reference import langevin_reference
from ebmfast.training.config import PRESETS, TrainConfig
from ebmfast.training.trainer import STEP_METRICS, VAL_METRICS, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_train_step_is_the_seed_recipe():
    """One train_step equals the seed's step written out independently: noisy clamped reals, Langevin chains from
    the buffer (the eager reference fed the sampler's noise stream), reg + cdiv, grad-norm clip 0.1, Adam."""
    cfg = tiny_config(lr=1e-3, alpha=0.1)
    tr = Trainer(cfg, data=small_data(), device="cpu", out_dir=None, progress=False)
    real = small_data().train_images[:16]

    model = copy.deepcopy(tr.model)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.0, 0.999))
    gen = torch.Generator().manual_seed(0)
    gen.set_state(tr.gen.get_state())
    buffer = copy.deepcopy(tr.buffer)
    buffer.generator = gen
    real2 = (real + 0.005 * torch.randn(real.shape, generator=gen)).clamp(-1, 1)
    start = buffer.draw(16)
    z = tr.sampler.noise_stream(start, cfg.sampler_steps)
    fake2 = langevin_reference(model, start, cfg.sampler_steps, 10.0, 0.005, 0.03, noise=z)
    out = model(torch.cat([real2, fake2]))
    r, f = out.chunk(2)
    loss = 0.1 * (r**2 + f**2).mean() + (f.mean() - r.mean())
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    opt.step()

    m = tr.train_step(real)
    assert set(STEP_METRICS) <= set(m)
    # Same float32 operations in the same order: equal up to the last bits of the summations.
    assert m["loss"] == pytest.approx(loss.item(), abs=1e-6)
    assert m["loss"] == pytest.approx(m["loss_regularization"] + m["loss_contrastive_divergence"], abs=1e-6)
    assert m["loss_contrastive_divergence"] == pytest.approx(m["metrics_avg_fake"] - m["metrics_avg_real"], abs=1e-6)
    for (name, p), q in zip(tr.model.named_parameters(), model.parameters()):
        assert_close_verbose(p, q, atol=1e-6, what=name)
    # the chains went back into the buffer (the first 16 slots: the ring pointer started at 0)
    assert_close_verbose(tr.buffer.storage[:16], fake2, atol=1e-6, what="buffer")
    assert int(tr.buffer.ptr) == 16


@pytest.mark.slow
def test_training_widens_gap_between_data_and_noise():
    """A few dozen iterations on the embedded MNIST subset: mean f(held-out digits) - mean f(uniform noise) grows.

    lr 1e-3 (10x the seed's) so that 32 iterations of a 16-wide model move it clearly: measured gap -0.0005 -> 1.95
    (seed lr: -0.0005 -> 0.027)."""
    data = small_data(n_train=1024, n_val=128)
    cfg = tiny_config(
        hidden_features=16, batch_size=32, sampler_steps=10, buffer_size=512, lr=1e-3, epochs=1, sample_every=0
    )
    tr = Trainer(cfg, data=data, device="cpu", out_dir=None, progress=False)
    noise = torch.rand((128, 1, 28, 28), generator=torch.Generator().manual_seed(0)) * 2 - 1

    @torch.no_grad()
    def gap():
        return (tr.model(data.val_images).mean() - tr.model(noise).mean()).item()

    before = gap()
    result = tr.fit()
    after = gap()
    assert result.status == "completed" and result.iteration == 32
    assert after > before + 0.5, f"data-minus-noise gap did not widen: {before:.4f} -> {after:.4f}"
    assert result.metrics["rand_out"] < result.metrics["val_real_out"]


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_fit_writes_the_output_layout(tmp_path):
    cfg = tiny_config(tensorboard=True, epochs=2)
    out = tmp_path / "run"
    tr = Trainer(cfg, data=small_data(), device="cpu", out_dir=out, progress=False)
    result = tr.fit()
    tr.close()
    assert result.status == "completed" and result.epoch == 2 and result.iteration == 20
    assert json.loads((out / "config.json").read_text()) == cfg.to_dict()
    assert TrainConfig.from_dict(json.loads((out / "config.json").read_text())) == cfg
    rows = _read_csv(out / "metrics.csv")
    names = {r["metric"] for r in rows}
    assert set(STEP_METRICS) | set(VAL_METRICS) | {"rand_out", "lr"} <= names
    losses = [r for r in rows if r["metric"] == "loss"]
    assert [int(r["step"]) for r in losses] == list(range(1, 21))
    lrs = [float(r["value"]) for r in rows if r["metric"] == "lr"]
    assert lrs == pytest.approx([1e-4, 1e-4 * 0.97])  # StepLR per epoch
    assert (out / "checkpoints" / "last.pt").is_file() and (out / "checkpoints" / "best.pt").is_file()
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert "finished 2 epochs" in (out / "train.log").read_text()
    # grids: generation = rows of chains x (gen_steps / gen_show_every) columns; buffer = 8 images in one row;
    # each digit blown up 3x by nearest-neighbour (84 pixels), under a title
    gen = Image.open(out / "samples" / "generation_epoch001.png")
    assert_honest_grid(gen, ncols=2, nrows=2)  # 2 columns (steps 2 and 4) x 2 chains
    assert gen.size[1] > 2 * 84 + 20  # room for the title, the caption and the step numbers
    buf = Image.open(out / "samples" / "buffer_epoch000.png")
    assert_honest_grid(buf, ncols=8, nrows=1)


@pytest.mark.slow
def test_best_checkpoint_tracks_min_val_contrastive_divergence(tmp_path):
    from ebmfast.training.checkpoint import load_checkpoint

    tr = Trainer(tiny_config(epochs=3), data=small_data(), device="cpu", out_dir=tmp_path, progress=False)
    tr.fit()
    tr.close()
    vals = [
        float(r["value"]) for r in _read_csv(tmp_path / "metrics.csv") if r["metric"] == "val_contrastive_divergence"
    ]
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert best["trainer"]["best_val"] == pytest.approx(min(vals))
    assert best["trainer"]["epoch"] == 1 + vals.index(min(vals))


@pytest.mark.slow
def test_callbacks_get_called_and_their_metrics_logged(tmp_path):
    calls = []

    class Probe:
        def on_epoch_end(self, trainer, epoch):
            calls.append(("epoch", epoch, trainer.iteration))
            return {"probe_metric": 1.5 + epoch}

        def on_step_end(self, trainer, iteration, metrics):
            calls.append(("step", iteration))
            return {"probe_step": float(iteration)} if iteration == 3 else None

    tr = Trainer(
        tiny_config(epochs=2, sample_every=0),
        data=small_data(),
        device="cpu",
        out_dir=tmp_path,
        callbacks=[Probe()],
        progress=False,
    )
    tr.fit()
    tr.close()
    assert ("epoch", 0, 10) in calls and ("epoch", 1, 20) in calls
    assert sum(1 for c in calls if c[0] == "step") == 20
    rows = _read_csv(tmp_path / "metrics.csv")
    assert [float(r["value"]) for r in rows if r["metric"] == "probe_metric"] == [1.5, 2.5]
    assert [(r["step"], r["value"]) for r in rows if r["metric"] == "probe_step"] == [("3", "3.0")]


def test_trainer_rejects_bad_inputs(tmp_path):
    data = small_data()
    with pytest.raises(TypeError, match="TrainConfig"):
        Trainer({"lr": 1e-4}, data=data, out_dir=None)
    bad_shape = DataSplits("x", torch.zeros(20, 1, 32, 32), torch.zeros(20), data.val_images, data.val_labels)
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"):
        Trainer(tiny_config(), data=bad_shape, device="cpu", out_dir=None)
    out_of_range = DataSplits("x", data.train_images * 3, data.train_labels, data.val_images, data.val_labels)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        Trainer(tiny_config(), data=out_of_range, device="cpu", out_dir=None)
    with pytest.raises(ValueError, match="larger than"):
        Trainer(tiny_config(batch_size=128, buffer_size=256), data=small_data(n_train=100), device="cpu", out_dir=None)
    with pytest.raises(ValueError, match="graph"):
        Trainer(tiny_config(sampler_backend="graph"), data=data, device="cpu", out_dir=None)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            Trainer(tiny_config(), data=data, device="cuda", out_dir=None)
    tr = Trainer(tiny_config(), data=data, device="cpu", out_dir=None)
    with pytest.raises(ValueError, match=r"\(B, 1, 28, 28\)"):
        tr.train_step(torch.zeros(4, 28, 28))
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_out_dir_holding_a_run_is_not_overwritten(tmp_path):
    cfg = tiny_config(max_iterations=2, sample_every=0)
    tr = Trainer(cfg, data=small_data(), device="cpu", out_dir=tmp_path, progress=False)
    tr.fit()
    tr.close()
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(cfg, data=small_data(), device="cpu", out_dir=tmp_path)
    Trainer(cfg, data=small_data(), device="cpu", out_dir=tmp_path, overwrite=True).close()


def test_presets():
    tutorial = TrainConfig.preset("tutorial")
    assert tutorial == TrainConfig()
    seed = dict(
        batch_size=128,
        lr=1e-4,
        betas=(0.0, 0.999),
        lr_gamma=0.97,
        grad_norm_clip=0.1,
        alpha=0.1,
        epochs=60,
        seed=42,
        sampler_steps=60,
        sampler_step_size=10.0,
        sampler_noise_std=0.005,
        sampler_grad_clip=0.03,
        buffer_size=8192,
        buffer_fresh_prob=0.05,
        hidden_features=32,
        rand_out_images=1024,
        sample_every=5,
        gen_chains=8,
        gen_steps=256,
        gen_show_every=32,
        buffer_grid_images=32,
        real_noise_std=0.005,
    )
    for k, v in seed.items():
        assert getattr(tutorial, k) == v, k
    quick = TrainConfig.preset("quick")
    assert quick.epochs < tutorial.epochs and quick.data == "mnist5k"
    assert set(PRESETS) == {"quick", "tutorial"}
    with pytest.raises(ValueError, match="preset must be one of"):
        TrainConfig.preset("fast")


# ------------------------------------------------------------------------- the iteration: CDStep, flushes, timing
OLD_RUN = json.loads((Path(__file__).parent / "data" / "old_trainer_tiny_run.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("sync_every", [1, 4])
def test_trainer_reproduces_the_old_trainer(sync_every):
    """The trainer on CDStep gives the metrics, weights and replay buffer that the trainer before it (its own copy
    of the step, host reads every iteration) recorded in tests/data/old_trainer_tiny_run.json, whatever sync_every
    is. Bitwise on the platform of the recording (its torch, architecture, vectorisation and processor; one thread);
    elsewhere float32 sums round differently, so there the comparison allows 1e-5 relative or 1e-7
    absolute (two processors running the old code agreed within that in every recorded value)."""
    steps = []

    class Probe:
        def on_step_end(self, trainer, iteration, metrics):
            steps.append((iteration, metrics))

    cfg = tiny_config(epochs=2, collapse_check_every=3, sync_every=sync_every)
    tr = Trainer(cfg, data=small_data(), device="cpu", out_dir=None, callbacks=[Probe()], progress=False)
    result = tr.fit()
    exact = recorded_here(OLD_RUN["platform"])

    def same(a, b):
        return a == b if exact else a == pytest.approx(b, **TOLERANCE)

    assert result.iteration == OLD_RUN["iteration"] == 20
    assert [it for it, _ in steps] == [it for it, _ in OLD_RUN["steps"]]
    for (it, got), (_, want) in zip(steps, OLD_RUN["steps"]):
        for key, value in want.items():  # the old metrics; the new add update_skipped (0 here)
            assert same(got[key], value), (it, key, got[key], value)
        assert got["update_skipped"] == 0.0
    for key, value in OLD_RUN["final"].items():
        assert same(result.metrics[key], value), key
    for name, p in tr.model.named_parameters():
        assert same(p.detach().double().sum().item(), OLD_RUN["param_sums"][name]), name
    assert same(tr.buffer.storage.double().sum().item(), OLD_RUN["buffer_sum"])


@pytest.mark.slow
def test_flushes_hand_every_iteration_in_order(tmp_path):
    """sync_every=4: callbacks, the CSV and the monitor get all 20 iterations in order, at flushes after the first
    iteration, every 4th iteration and at each epoch's end (10 iterations per epoch)."""
    seen = []

    class Probe:
        def on_step_end(self, trainer, iteration, metrics):
            seen.append((iteration, trainer.iteration))
            return {"probe_step": float(iteration)} if iteration == 3 else None

    cfg = tiny_config(epochs=2, sample_every=0, sync_every=4, snapshot_every=50, collapse_check_every=3)
    tr = Trainer(cfg, data=small_data(), device="cpu", out_dir=tmp_path, callbacks=[Probe()], progress=False)
    result = tr.fit()
    tr.close()
    assert [it for it, _ in seen] == list(range(1, 21))
    flushed_at = [now for _, now in seen]
    assert sorted(set(flushed_at)) == [1, 4, 8, 10, 12, 16, 20]
    assert all(0 <= now - it < 4 for it, now in seen)
    rows = _read_csv(tmp_path / "metrics.csv")
    assert [int(r["step"]) for r in rows if r["metric"] == "loss"] == list(range(1, 21))
    assert [int(r["step"]) for r in rows if r["metric"] == "divergence/noise_out"] == [3, 6, 9, 12, 15, 18]
    assert [(r["step"], r["value"]) for r in rows if r["metric"] == "probe_step"] == [("3", "3.0")]
    assert not any(r["metric"] == "update_skipped" for r in rows)  # logged only for a skipped update
    # timing: the first iteration (compilation, capture) apart from the steady loop and the epoch ends
    assert set(result.timing) == {"fit_s", "first_iteration_s", "iteration_ms", "steady_iterations", "epoch_end_s"}
    assert result.timing["steady_iterations"] == 19
    timing_rows = {r["metric"]: float(r["value"]) for r in rows if r["metric"].startswith("time/")}
    assert timing_rows == {f"time/{k}": pytest.approx(v) for k, v in result.timing.items()}
    assert "metrics copied to the host every 4" in (tmp_path / "train.log").read_text()


def test_sync_every_and_iteration_graph_settings():
    from ebmfast.training.step import iteration_graph_reason, resolve_sync_every

    assert resolve_sync_every(tiny_config(), torch.device("cpu")) == 1
    assert resolve_sync_every(tiny_config(), torch.device("cuda")) == 10
    assert resolve_sync_every(tiny_config(sync_every=7), torch.device("cuda")) == 7
    for bad in (0, -1, 1.5, True):
        with pytest.raises((ValueError, TypeError), match="sync_every"):
            tiny_config(sync_every=bad)
    with pytest.raises(TypeError, match="iteration_graph"):
        tiny_config(iteration_graph=1)
    assert TrainConfig.parse_value("sync_every", "none") is None and TrainConfig.parse_value("sync_every", "5") == 5
    cfg = TrainConfig()
    assert "not on cpu" in iteration_graph_reason(cfg, torch.device("cpu"), "compiled")
    assert "turned off" in iteration_graph_reason(cfg.replace(iteration_graph=False), torch.device("cuda"), "graph")
    for backend in ("eager", "compiled"):
        assert "reference loop" in iteration_graph_reason(cfg, torch.device("cuda"), backend)
    assert iteration_graph_reason(cfg, torch.device("cuda"), "graph") is None
    assert iteration_graph_reason(cfg, torch.device("cuda"), "fused") is None
    tr = Trainer(tiny_config(), data=small_data(), device="cpu", out_dir=None, progress=False)
    assert not tr.runner.captured and "not on cpu" in tr.runner.describe()
    assert isinstance(tr.optimizer.param_groups[0]["lr"], float) and tr.sampler.check_finite is False


def test_step_history_copies_exact_values_once():
    from ebmfast.cd import CD_METRICS
    from ebmfast.training.step import StepHistory

    h = StepHistory(2, torch.device("cpu"))
    a = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.0], dtype=torch.float32)
    h.record(7, a)
    h.record(8, a * 3, noise_out=torch.tensor(-1.25, dtype=torch.float64))
    assert h.full and len(h) == 2
    with pytest.raises(RuntimeError, match="read"):
        h.record(9, a)
    rows = h.read()
    assert [(it, noise) for it, _, noise in rows] == [(7, None), (8, -1.25)]
    assert list(rows[0][1]) == list(CD_METRICS)
    assert list(rows[0][1].values()) == a.tolist() and list(rows[1][1].values()) == (a * 3).tolist()
    assert len(h) == 0 and h.read() == []
    h.record(9, a, noise_out=2.5)
    assert h.read()[0][2] == 2.5


def test_iteration_runner_falls_back_when_capture_fails():
    """A capture that raises (CDGraph has put the training state back) switches to the uncaptured step for good, and
    says why; an error in a replay of a captured graph is not swallowed."""
    from ebmfast.training.step import IterationRunner

    calls, notes = [], []

    class Step:
        def __call__(self, real):
            calls.append("step")
            return real.sum()

    class Graph:
        capture_failed = True

        def __call__(self, real):
            calls.append("graph")
            raise RuntimeError("capture went wrong")

        def invalidate(self):
            pass

    class NotCapturable:
        optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)])

    plain = IterationRunner(NotCapturable(), None)  # no reason given, but the optimizer cannot be captured
    assert not plain.captured and "not graph-ready (Adam was not built with capturable=True)" in plain.describe()
    runner = IterationRunner(Step(), "set below", on_fallback=notes.append)
    runner.graph, runner.reason = Graph(), None
    assert runner.captured
    assert runner(torch.ones(2)) == 2 and calls == ["graph", "step"]
    assert not runner.captured and "capture failed (RuntimeError: capture went wrong)" in runner.describe()
    assert len(notes) == 1 and "continuing with the uncaptured CDStep" in notes[0]
    runner(torch.ones(2))
    assert calls == ["graph", "step", "step"]
    Graph.capture_failed = False
    runner.graph = Graph()
    with pytest.raises(RuntimeError, match="capture went wrong"):
        runner(torch.ones(2))


def test_adopt_optimizer_moves_state_between_float_and_tensor_lr():
    """What resume and roll-back rely on: optimizer.load_state_dict replaces the param groups (a CPU checkpoint has a
    float lr and capturable=False; a CUDA one a tensor lr and capturable=True); adopt_optimizer gives them the run's
    own lr (the same tensor object, so a captured graph keeps reading it) and flags back."""
    from ebmfast.training.step import adopt_optimizer

    model = torch.nn.Linear(3, 1)
    plain = torch.optim.Adam(model.parameters(), lr=2e-3, betas=(0.0, 0.999))
    model(torch.ones(2, 3)).sum().backward()
    plain.step()
    lr_t = torch.tensor(5e-4)
    graphy = torch.optim.Adam(model.parameters(), lr=lr_t, betas=(0.0, 0.999), capturable=True)
    graphy.load_state_dict(plain.state_dict())
    assert graphy.param_groups[0]["lr"] == 2e-3 and graphy.param_groups[0]["capturable"] is False
    adopt_optimizer(graphy, [lr_t], capturable=True)
    group = graphy.param_groups[0]
    assert group["lr"] is lr_t and float(lr_t) == pytest.approx(2e-3) and group["capturable"] is True
    # and back: a checkpoint written with a tensor lr resumed where the lr is a float (e.g. on CPU)
    plain2 = torch.optim.Adam(model.parameters(), lr=1.0, betas=(0.0, 0.999))
    plain2.load_state_dict(graphy.state_dict())
    adopt_optimizer(plain2, None)
    group = plain2.param_groups[0]
    assert isinstance(group["lr"], float) and group["lr"] == pytest.approx(2e-3) and group["capturable"] is False
    model(torch.ones(2, 3)).sum().backward()
    plain2.step()  # steps on the CPU (a capturable group would refuse)


def test_readme_training_loop_example_runs(capsys):
    """README's "own training loop" example, as written, with 2 Langevin steps, the eager sampler and a small buffer
    (so that it runs in a second on the CPU)."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = text.split("## Use the sampler in your own training loop", 1)[1].split("```python\n", 1)[1]
    block = block.split("```", 1)[0]
    for old, new in (("steps=60", "steps=2"), ('backend="auto"', 'backend="eager"'), ("capacity=8192", "capacity=16")):
        assert old in block, old
        block = block.replace(old, new)
    batches = [torch.rand(4, 1, 28, 28) * 2 - 1 for _ in range(2)]
    scope = {"device": torch.device("cpu"), "batches": batches}
    exec(compile(block, "README.md", "exec"), scope)
    assert scope["metrics"].shape == (7,) and int(scope["buffer"].ptr) == 8
    assert "'update_skipped': 0.0" in capsys.readouterr().out
