"""The trainer on CUDA with the whole iteration as one CUDA graph (``CDGraph``, the default there): the same run as
the uncaptured step, across an epoch end (the lr schedule writes the lr tensor the graph reads), an exact resume, a
divergence roll-back (re-capture, lr halved in place).

Tolerance: ``torch.backends.cudnn.deterministic = True`` (and no cuDNN benchmarking), so both runs launch the same
kernels on the same data and are compared bitwise, as ``tests/test_cd_graph_cuda.py`` compares CDGraph with CDStep.
The sampler backend is ``graph``: its chain is captured on its own when the iteration is not, and recorded inline
(as ``fused``) inside the iteration graph. Pictures are off (``sample_every=0``): each would compile another chain.
"""

from __future__ import annotations

import pytest
import torch
from train_helpers import small_data, tiny_config

from ebmfast.training.trainer import Trainer

pytestmark = pytest.mark.cuda

# 160 images / batch 16 = 10 iterations per epoch: 13 iterations cross one epoch end (validation, rand_out, StepLR).
CFG = dict(sampler_backend="graph", sample_every=0, epochs=3, snapshot_every=4, collapse_check_every=3)


@pytest.fixture(autouse=True)
def deterministic():
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


class Probe:
    def __init__(self):
        self.steps = []

    def on_step_end(self, trainer, iteration, metrics):
        self.steps.append((iteration, metrics))


def _run(out, max_iterations, resume=None, runner_wrap=None, **kw):
    probe = Probe()
    tr = Trainer(
        tiny_config(**{**CFG, **kw}, max_iterations=max_iterations),
        data=small_data(),
        device="cuda",
        out_dir=out,
        resume=resume,
        callbacks=[probe],
        progress=False,
    )
    if runner_wrap is not None:
        tr.runner = runner_wrap(tr)
    result = tr.fit()
    tr.close()
    return tr, result, probe.steps


def _diffs(a: Trainer, b: Trainer) -> list[str]:
    out = [n for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()) if not torch.equal(p, q)]
    if not torch.equal(a.buffer.storage, b.buffer.storage) or int(a.buffer.ptr) != int(b.buffer.ptr):
        out.append("buffer")
    for i, (sa, sb) in enumerate(zip(a.optimizer.state.values(), b.optimizer.state.values())):
        if not all(torch.equal(sa[k], sb[k]) for k in ("exp_avg", "exp_avg_sq", "step")):
            out.append(f"adam state {i}")
    if a.sampler.state_dict() != b.sampler.state_dict():
        out.append("sampler")
    return out


@pytest.fixture(scope="module")
def graph_run(tmp_path_factory):
    """13 iterations with the iteration graph, metrics copied every 4 iterations (CUDA's default would be 10)."""
    return _run(tmp_path_factory.mktemp("graph"), 13, sync_every=4)


def test_iteration_graph_gives_the_uncaptured_run(graph_run, tmp_path):
    graphed, g_result, g_steps = graph_run
    assert graphed.runner.captured and graphed.runner.graph.captures == 1  # the lr schedule did not re-capture
    assert graphed.optimizer.param_groups[0]["lr"] is graphed._lr_tensors[0]
    assert float(graphed._lr_tensors[0]) == pytest.approx(1e-4 * 0.97)
    plain, p_result, p_steps = _run(tmp_path, 13, iteration_graph=False, sync_every=1)
    assert not plain.runner.captured and "turned off" in plain.runner.describe()
    assert [it for it, _ in g_steps] == [it for it, _ in p_steps] == list(range(1, 14))
    for (it, a), (_, b) in zip(g_steps, p_steps):
        assert a == b, (it, a, b)
    assert _diffs(graphed, plain) == []
    assert g_result.metrics == p_result.metrics
    assert {"first_iteration_s", "iteration_ms", "epoch_end_s"} <= set(g_result.timing)


def test_resume_with_the_iteration_graph_is_bit_identical(graph_run, tmp_path):
    full, f_result, _ = graph_run
    _, part_result, _ = _run(tmp_path, 7, sync_every=4)
    assert part_result.status == "max_iterations" and part_result.iteration == 7
    resumed, r_result, r_steps = _run(tmp_path, 13, resume=tmp_path / "checkpoints" / "last.pt", sync_every=4)
    assert resumed.runner.captured
    assert [it for it, _ in r_steps] == list(range(8, 14))
    assert _diffs(full, resumed) == []
    assert f_result.metrics == r_result.metrics


class PoisonAfter:
    """Weights set to NaN right after the ``at``-th iteration, inside the loop (see test_divergence.py)."""

    def __init__(self, trainer, at=5):
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


def test_rollback_with_the_iteration_graph(tmp_path):
    """The poisoned iteration is skipped inside the graph; the roll-back restores the snapshot at 4, halves the lr
    tensor in place, and the graph is captured again; the run equals the same run uncaptured."""
    graphed, g_result, g_steps = _run(tmp_path / "g", 13, runner_wrap=PoisonAfter, sync_every=3)
    plain, p_result, p_steps = _run(tmp_path / "p", 13, runner_wrap=PoisonAfter, iteration_graph=False)
    for tr, result in ((graphed, g_result), (plain, p_result)):
        assert result.recoveries == 1 and result.iteration == 13
        assert tr.events[0]["reason"] == "non_finite" and "iteration 6" in tr.events[0]["detail"]
    assert graphed.runner.inner.graph.captures == 2  # once, and again after the roll-back
    lr = graphed.optimizer.param_groups[0]["lr"]
    assert lr is graphed._lr_tensors[0] and float(lr) == pytest.approx(1e-4 * 0.5 * 0.97)
    assert [it for it, m in g_steps if m["update_skipped"]] == [6]
    assert _diffs(graphed, plain) == []
    assert g_result.metrics == p_result.metrics
