"""backend='auto': the choice logic, timings injected (on CUDA the timing itself needs a GPU and runs in
bench/device_check.sh; on CPU examples/generic_gradient.py and examples/tutorial_switch.py measure)."""

import json
import math

import pytest
import torch

from ebmfast import CNNModel, LangevinSampler, autotune


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    monkeypatch.setattr(autotune, "_gpu", lambda device: "Fake GPU")
    monkeypatch.setenv("EBMFAST_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("EBMFAST_AUTOTUNE", raising=False)
    table = tmp_path / "table.json"
    table.write_text(json.dumps({"rows": []}))
    monkeypatch.setattr(autotune, "TABLE_PATH", table)
    return tmp_path


def _write_table(path, model, rows):
    arch = autotune.architecture_key(model)
    path.write_text(
        json.dumps(
            {
                "rows": [
                    dict(
                        gpu="Fake GPU",
                        architecture=arch,
                        sample_shape=[1, 28, 28],
                        precision="fp32",
                        batch=b,
                        us_per_step=t,
                    )
                    for b, t in rows
                ]
            }
        )
    )


def test_without_measurements_auto_is_graph(fake_gpu):
    model, x = CNNModel(hidden_features=8), torch.zeros(4, 1, 28, 28)
    backend, why = autotune.choose(model, x, "fp32", ["graph", "triton", "persistent"])
    assert backend == "graph" and "no measurement" in why


def test_committed_table_picks_the_fastest_at_the_nearest_batch(fake_gpu):
    model = CNNModel(hidden_features=8)
    _write_table(
        autotune.TABLE_PATH,
        model,
        [(128, {"graph": 230.0, "triton": 40.0, "persistent": 12.0}), (16384, {"graph": 8000.0, "triton": 3000.0})],
    )
    assert (
        autotune.choose(model, torch.zeros(100, 1, 28, 28), "fp32", ["graph", "triton", "persistent"])[0]
        == "persistent"
    )
    # a backend the model cannot run is never picked
    assert autotune.choose(model, torch.zeros(100, 1, 28, 28), "fp32", ["graph", "triton"])[0] == "triton"
    assert autotune.choose(model, torch.zeros(9000, 1, 28, 28), "fp32", ["graph", "triton"])[0] == "triton"
    # another architecture has no rows
    assert (
        autotune.choose(CNNModel(hidden_features=4), torch.zeros(100, 1, 28, 28), "fp32", ["graph", "triton"])[0]
        == "graph"
    )


def test_never_slower_than_graph(fake_gpu):
    model = CNNModel(hidden_features=8)
    _write_table(autotune.TABLE_PATH, model, [(128, {"graph": 100.0, "triton": 150.0, "persistent": math.inf})])
    assert autotune.choose(model, torch.zeros(128, 1, 28, 28), "fp32", ["graph", "triton", "persistent"])[0] == "graph"
    _write_table(autotune.TABLE_PATH, model, [(128, {"triton": 10.0})])  # no graph figure to compare with
    assert autotune.choose(model, torch.zeros(128, 1, 28, 28), "fp32", ["graph", "triton"])[0] == "graph"


def test_the_users_timing_cache_comes_first(fake_gpu):
    model, x = CNNModel(hidden_features=8), torch.zeros(64, 1, 28, 28)
    _write_table(autotune.TABLE_PATH, model, [(64, {"graph": 100.0, "triton": 50.0})])
    key = autotune._entry_key(model, x, "fp32")
    autotune.cache_path().write_text(json.dumps({key: {"graph": 100.0, "triton": 120.0}}))
    backend, why = autotune.choose(model, x, "fp32", ["graph", "triton"])
    assert backend == "graph" and "timing cache" in why


def test_architecture_key_depends_on_shapes_not_values():
    a, b = CNNModel(hidden_features=8), CNNModel(hidden_features=8)
    with torch.no_grad():
        b.cnn_layers[0].weight.add_(1.0)
    assert autotune.architecture_key(a) == autotune.architecture_key(b)
    assert autotune.architecture_key(a) != autotune.architecture_key(CNNModel(hidden_features=16))


def test_tune_needs_cuda():
    from ebmfast import LangevinSampler

    with pytest.raises(ValueError, match="CUDA"):
        autotune.tune(LangevinSampler(CNNModel(hidden_features=4)), torch.zeros(2, 1, 28, 28))


def test_recorded_times_are_read_back(fake_gpu):
    model, x = CNNModel(hidden_features=8), torch.zeros(32, 1, 28, 28)
    autotune.record(model, x, "fp32", {"graph": 50.0, "persistent": 20.0})
    assert autotune.choose(model, x, "fp32", ["graph", "persistent"])[0] == "persistent"


def test_autotune_env_times_on_first_use(fake_gpu, monkeypatch):
    model, x = CNNModel(hidden_features=8), torch.zeros(32, 1, 28, 28)
    calls = []

    def tuner():
        calls.append(1)
        return {"graph": 10.0, "triton": 5.0}

    assert autotune.choose(model, x, "fp32", ["graph", "triton"], tuner=tuner)[0] == "graph"  # not asked to time
    monkeypatch.setenv("EBMFAST_AUTOTUNE", "1")
    backend, why = autotune.choose(model, x, "fp32", ["graph", "triton"], tuner=tuner)
    assert backend == "triton" and "timed now" in why and calls == [1]


# ------------------------------------------------------------------------------------------------ auto on CPU
class _Clock:
    """A clock that each fake gradient advances by its own cost."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _fake_grads(clock, costs, calls):
    def make(name):
        def g(x):
            calls.append(name)
            cost = costs[name].pop(0) if isinstance(costs[name], list) else costs[name]
            if cost is None:
                raise RuntimeError("no kernel for this op")
            clock.now += cost
            return x

        return g

    return {name: make(name) for name in costs}


def test_time_cpu_compiles_first_then_interleaves_and_keeps_the_fastest():
    clock, calls = _Clock(), []
    grads = _fake_grads(clock, {"compiled": [9.0, 0.003, 0.002], "eager": [0.005, 0.004]}, calls)
    times = autotune.time_cpu(grads, torch.zeros(2), rounds=2, clock=clock)
    assert calls == ["compiled", "compiled", "eager", "eager", "compiled"]  # compile, then the order rotated
    assert times == pytest.approx({"compile_s": 9.0, "compiled": 0.002, "eager": 0.004})


def test_time_cpu_a_failing_candidate_measures_inf():
    clock, calls = _Clock(), []
    times = autotune.time_cpu(
        _fake_grads(clock, {"compiled": None, "eager": 0.001}, calls), torch.zeros(2), clock=clock
    )
    assert times["compiled"] == math.inf and times["eager"] == 0.001
    assert calls.count("compiled") == 1  # not tried again after it failed
    backend, why = autotune.choose_cpu(times)
    assert backend == "eager" and "no kernel for this op" in why


@pytest.mark.parametrize(
    ("compiled", "eager", "expected"),
    [(0.002, 0.003, "compiled"), (0.003, 0.002, "eager"), (0.00104, 0.001, "compiled"), (0.00106, 0.001, "eager")],
)
def test_choose_cpu_keeps_compiled_unless_below_the_ratio_of_eager(compiled, eager, expected):
    # 0.00104 s: 0.96x eager's speed, kept; 0.00106 s: 0.94x, below CPU_MIN_RATIO
    backend, why = autotune.choose_cpu({"compiled": compiled, "eager": eager, "compile_s": 12.3})
    assert backend == expected
    assert f"{1e3 * compiled:.2f} ms per gradient compiled vs {1e3 * eager:.2f} ms eager" in why
    assert "compile 12.3 s, not counted" in why


def test_choose_cpu_takes_eager_when_nothing_was_compiled():
    backend, why = autotune.choose_cpu({"compiled": 0.001, "eager": 0.002, "compile_s": 1.0}, uncompiled=True)
    assert backend == "eager" and "compiled no graph" in why


class _Sin(torch.nn.Module):
    def forward(self, x):
        return torch.sin(x)  # outside the recognised vocabulary: the generic path


class _Cos(torch.nn.Module):
    def forward(self, x):
        return torch.cos(x)


def _tiny(act=None):
    torch.manual_seed(0)
    act = _Sin() if act is None else act
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3), act, torch.nn.Linear(3, 1))


def test_sampler_auto_on_cpu_times_once_per_shape_and_structure(monkeypatch):
    timed = []

    def fake_time_cpu(grads, x):
        timed.append(tuple(x.shape))
        assert set(grads) == {"compiled", "eager"}
        return {"compiled": 0.002, "eager": 0.001, "compile_s": 3.0}

    monkeypatch.setattr(autotune, "time_cpu", fake_time_cpu)
    model = _tiny()
    sampler = LangevinSampler(model, steps=2, backend="auto", seed=0)
    x = torch.rand(4, 1, 3, 4)
    assert "not timed yet" in sampler.explain(x) and not timed  # explain stays cheap
    sampler.sample(x)
    sampler.sample(x)
    assert sampler.last_backend == "eager" and timed == [(4, 1, 3, 4)]
    assert "-> 'eager'" in sampler.explain(x) and "2.00 ms per gradient compiled vs 1.00 ms eager" in sampler.explain(x)
    sampler.sample(torch.rand(5, 1, 3, 4))  # another shape: timed again
    model[2] = _Cos()  # another structure: timed again
    sampler.sample(x)
    assert timed == [(4, 1, 3, 4), (5, 1, 3, 4), (4, 1, 3, 4)]


def test_sampler_auto_on_cpu_keeps_compiled_when_it_times_faster(monkeypatch):
    monkeypatch.setattr(autotune, "time_cpu", lambda grads, x: {"compiled": 0.001, "eager": 0.002, "compile_s": 3.0})
    sampler = LangevinSampler(_tiny(), steps=2, backend="auto", seed=0)
    x = torch.rand(4, 1, 3, 4)
    assert sampler._choose(x)[0] == "compiled"  # the choice only: sampling would compile (slow on CPU)
    assert "-> 'compiled'" in sampler.explain(x)


def test_sampler_auto_on_cpu_does_not_time_a_recognised_model(monkeypatch):
    """A model the chain program runs gets the compiled gradient without timing: the same numbers on every run (a
    resumed run stays bit-identical)."""
    monkeypatch.setattr(autotune, "time_cpu", lambda grads, x: pytest.fail("a recognised model was timed"))
    sampler = LangevinSampler(_tiny(torch.nn.Tanh()), steps=2, backend="auto", seed=0)
    x = torch.rand(4, 1, 3, 4)
    backend, why = sampler._choose(x)
    assert backend == "compiled" and "recognised" in why and "not timed" in sampler.explain(x)
