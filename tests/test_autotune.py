"""backend='auto' on CUDA: the choice logic (the timing itself needs a GPU and runs in bench/device_check.sh)."""

import json
import math

import pytest
import torch

from ebmfast import CNNModel, autotune


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
