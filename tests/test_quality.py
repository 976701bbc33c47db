"""Sample quality: the Fréchet distance, the classifier and its cache, class statistics, QualityCallback."""

import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ebmfast import CNNModel, LangevinSampler
from ebmfast.data import DataSplits, load_dataset
from ebmfast.errors import OutputPathError
from ebmfast.evaluation import quality as q
from ebmfast.evaluation.generate import generate_from_noise
from ebmfast.evaluation.quality import (
    ClassifierConfig,
    QualityCallback,
    class_statistics,
    classifier_outputs,
    fd_baselines,
    frechet_distance,
    load_or_train_classifier,
    sqrtm_psd,
)

# Short training for the tests (about 3 s on an idle 2-core CPU): 4 epochs reach 94.0% on the held-out digits
# (measured; the default 8 reach 96.4%). The Fréchet-distance and class-statistics tests only need a decent feature
# space.
TEST_CFG = ClassifierConfig(epochs=4)
TINY_CFG = ClassifierConfig(epochs=1, max_train_images=300)  # for cache tests that retrain: well under a second


@pytest.fixture(scope="module")
def data():
    return load_dataset("mnist5k")


@pytest.fixture(scope="module")
def clf_cache(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("clf") / q.CLASSIFIER_FILENAME
    clf, info = load_or_train_classifier(path, data, TEST_CFG, progress=False)
    return path, clf, info


# ----------------------------------------------------------------------------------------------- Fréchet distance
def _scipy_fd(a: np.ndarray, b: np.ndarray) -> float:
    linalg = pytest.importorskip("scipy.linalg")
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    cross = linalg.sqrtm(s_a @ s_b)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(cross).real)


@pytest.mark.parametrize("dim,n", [(1, 50), (5, 40), (64, 300)])
def test_frechet_distance_matches_scipy_sqrtm(dim, n):
    g = torch.Generator().manual_seed(dim)
    mix_a, mix_b = torch.randn(dim, dim, generator=g), torch.randn(dim, dim, generator=g)
    a = torch.randn(n, dim, generator=g, dtype=torch.float64) @ mix_a.double()
    b = torch.randn(n, dim, generator=g, dtype=torch.float64) @ mix_b.double() + 0.5
    expected = _scipy_fd(a.numpy(), b.numpy())
    # both in float64; scipy's Schur-based sqrtm and our eigendecompositions agree to ~1e-9 relative
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-7, abs=1e-8)


def test_frechet_distance_closed_forms():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 8, generator=g, dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    shift = torch.arange(8, dtype=torch.float64)
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift.square().sum()), rel=1e-9)  # same covariance
    # 1-D: (mu1 - mu2)^2 + (s1 - s2)^2 with s the standard deviations
    x = torch.randn(500, 1, generator=g, dtype=torch.float64)
    y = 3.0 * torch.randn(500, 1, generator=g, dtype=torch.float64) + 2.0
    expected = (x.mean() - y.mean()) ** 2 + (x.std() - y.std()) ** 2
    assert frechet_distance(x, y) == pytest.approx(float(expected), rel=1e-9)
    assert frechet_distance(x, y) == pytest.approx(frechet_distance(y, x), rel=1e-9)


def test_sqrtm_psd_squares_back_and_handles_singular():
    g = torch.Generator().manual_seed(1)
    m = torch.randn(6, 3, generator=g, dtype=torch.float64)
    psd = m @ m.T  # rank 3: three (numerically) zero eigenvalues, some slightly negative from round-off
    r = sqrtm_psd(psd)
    torch.testing.assert_close(r @ r, psd, rtol=0, atol=1e-10)
    torch.testing.assert_close(r, r.T, rtol=0, atol=0)


def test_frechet_distance_rejects_bad_shapes():
    with pytest.raises(ValueError, match="same dimension"):
        frechet_distance(torch.zeros(5, 3), torch.zeros(5, 4))
    with pytest.raises(ValueError, match="N >= 2"):
        frechet_distance(torch.zeros(1, 3), torch.zeros(5, 3))


# ----------------------------------------------------------------------------------------------- classifier
@pytest.mark.slow
def test_classifier_is_accurate_on_held_out_digits(clf_cache, data):
    _, clf, info = clf_cache
    assert info["cache"] == "trained"
    assert info["val_accuracy"] >= 0.90, info  # 4 epochs: 94.0% measured; a broken recipe lands near 10%
    assert q.evaluate_classifier(clf, data.val_images, data.val_labels) == pytest.approx(info["val_accuracy"])


@pytest.mark.slow
def test_real_vs_real_fd_is_far_below_real_vs_noise(clf_cache, data):
    _, clf, _ = clf_cache
    base = fd_baselines(clf, data, 256, generator=torch.Generator().manual_seed(0))
    # measured with the default classifier: 13 vs 537 (8.9-17.7 vs 515-550 over 5 seeds); a feature space that
    # ignores the digits gives a ratio near 1
    assert base["fd_real_vs_real"] < 0.1 * base["fd_noise_vs_real"], base
    assert "held-out" in base["baseline_source"]
    # two disjoint training sets when the held-out split is too small for n
    small = DataSplits("x", data.train_images, data.train_labels, data.val_images[:10], data.val_labels[:10])
    base2 = fd_baselines(clf, small, 256, generator=torch.Generator().manual_seed(0))
    assert "disjoint" in base2["baseline_source"]
    assert base2["fd_real_vs_real"] < 0.1 * base2["fd_noise_vs_real"]


@pytest.mark.slow
def test_class_statistics_of_real_digits_and_of_one_class(clf_cache, data):
    _, clf, _ = clf_cache
    _, probs = classifier_outputs(clf, data.val_images)
    st = class_statistics(probs)
    assert sum(st["class_fractions"]) == pytest.approx(1.0)
    assert all(0.05 < f < 0.15 for f in st["class_fractions"]), st  # 50 of each digit held out
    assert st["class_entropy"] > 2.2 and st["mean_confidence"] > 0.85, st
    one = torch.zeros(20, 10, dtype=torch.float64)
    one[:, 3] = 0.6
    one[:, 5] = 0.4
    st1 = class_statistics(one)
    assert st1["class_fractions"][3] == 1.0 and st1["class_entropy"] == 0.0
    assert st1["mean_confidence"] == pytest.approx(0.6)
    assert st1["max_class_entropy"] == pytest.approx(math.log(10))


# ----------------------------------------------------------------------------------------------- cache
@pytest.mark.slow
def test_cache_is_reused_without_training(clf_cache, data, monkeypatch):
    path, clf, info = clf_cache

    def fail(*a, **k):
        raise AssertionError("a matching cache must not be retrained")

    monkeypatch.setattr(q, "train_classifier", fail)
    clf2, info2 = load_or_train_classifier(path, data, TEST_CFG, progress=False)
    assert info2["cache"] == "hit"
    assert info2["val_accuracy"] == info["val_accuracy"]
    for (k, v), v2 in zip(clf.state_dict().items(), clf2.state_dict().values()):
        torch.testing.assert_close(v, v2, rtol=0, atol=0, msg=k)


@pytest.mark.slow
def test_stale_cache_is_detected_and_rewritten(tmp_path, data):
    path = tmp_path / q.CLASSIFIER_FILENAME
    _, info = load_or_train_classifier(path, data, TINY_CFG, progress=False)
    assert info["cache"] == "trained" and path.is_file()
    assert load_or_train_classifier(path, data, TINY_CFG, progress=False)[1]["cache"] == "hit"

    other_cfg = ClassifierConfig(epochs=2, max_train_images=300)
    _, info = load_or_train_classifier(path, data, other_cfg, progress=False)
    assert info["cache"] == "retrained" and "config" in info["stale_reason"], info
    assert load_or_train_classifier(path, data, other_cfg, progress=False)[1]["cache"] == "hit"  # rewritten

    images = data.train_images.clone()
    images[:, 0, 0, 0] = 1.0  # one pixel position of the training data changed (in every image: the subset too)
    changed = DataSplits(data.name, images, data.train_labels, data.val_images, data.val_labels)
    _, info = load_or_train_classifier(path, changed, other_cfg, progress=False)
    assert info["cache"] == "retrained" and "training data differ" in info["stale_reason"], info

    blob = torch.load(path, weights_only=True)
    blob["meta"]["version"] = q.CLASSIFIER_VERSION - 1  # an older classifier recipe
    torch.save(blob, path)
    _, info = load_or_train_classifier(path, changed, other_cfg, progress=False)
    assert info["cache"] == "retrained" and "version" in info["stale_reason"], info


@pytest.mark.parametrize("kind", ["text", "checkpoint", "torch", "folder"])
def test_a_file_that_is_not_a_cache_is_never_overwritten(tmp_path, data, kind, monkeypatch):
    """Issue 22: a classifier path naming the checkpoint replaced the checkpoint with the classifier."""
    path = tmp_path / "m.pt"
    if kind == "text":
        path.write_bytes(b"not a torch file")
    elif kind == "checkpoint":
        shutil.copyfile(Path(__file__).parent / "data" / "checkpoint_v1.pt", path)
    elif kind == "torch":
        torch.save({"weights": torch.zeros(2)}, path)
    else:
        path.mkdir()
    before = path.read_bytes() if path.is_file() else None
    monkeypatch.setattr(q, "train_classifier", lambda *a, **k: pytest.fail("trained instead of refusing"))
    with pytest.raises(OutputPathError, match="not an ebmfast classifier cache|is a folder"):
        load_or_train_classifier(path, data, TINY_CFG, progress=False)
    assert (path.read_bytes() if path.is_file() else None) == before


@pytest.mark.slow
def test_training_is_reproducible_and_leaves_global_rng_alone(data):
    torch.manual_seed(7)
    before = torch.random.get_rng_state()
    a, _ = q.train_classifier(data, TINY_CFG, progress=False)
    assert torch.equal(torch.random.get_rng_state(), before)
    b, _ = q.train_classifier(data, TINY_CFG, progress=False)
    for (k, v), v2 in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(v, v2, rtol=0, atol=0, msg=k)


# ----------------------------------------------------------------------------------------------- generation + callback
def test_generate_from_noise_restores_the_sampler_stream():
    model = CNNModel(hidden_features=8)
    s = LangevinSampler(model, steps=3, backend="eager", seed=11)
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    s.sample(x)  # advance the stream
    state = s.state_dict()
    out1 = generate_from_noise(s, model, 5, 4, seed=3)
    assert s.state_dict() == state
    out2 = generate_from_noise(s, model, 5, 4, seed=3)
    torch.testing.assert_close(out1, out2, rtol=0, atol=0)  # fixed starts and noise: same samples
    after = s.sample(x)
    ref = LangevinSampler(model, steps=3, backend="eager", seed=11)
    ref.sample(x)
    torch.testing.assert_close(after, ref.sample(x), rtol=0, atol=0)  # training draws what it would have drawn


@pytest.mark.slow
def test_quality_callback_every_n_epochs(clf_cache, data, tmp_path):
    path, _, _ = clf_cache
    model = CNNModel(hidden_features=8)
    trainer = SimpleNamespace(
        model=model,
        sampler=LangevinSampler(model, steps=60, backend="eager", seed=0),
        config={"data": "mnist5k", "epochs": 10},
        device=torch.device("cpu"),
        out_dir=tmp_path,
        data=data,
    )
    cb = QualityCallback(every=4, n_samples=32, steps=4, classifier_path=path, classifier_config=TEST_CFG)
    assert [cb.should_run(e, 10) for e in range(10)] == [False, False, False, True] * 2 + [False, True]
    assert cb.on_epoch_end(trainer, 0) is None
    trainer.sampler.sample(torch.rand(2, 1, 28, 28), steps=2)  # a training run has drawn noise before
    state = trainer.sampler.state_dict()
    out = cb.on_epoch_end(trainer, 3)
    assert set(out) >= {"quality_fid", "quality_confidence", "quality_class_entropy", "quality_fid_real_baseline"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.values()), out
    assert 0.1 <= out["quality_confidence"] <= 1.0 and 0.0 <= out["quality_class_entropy"] <= math.log(10) + 1e-9
    assert cb.classifier_info["cache"] == "hit"
    assert trainer.sampler.state_dict() == state  # the training noise stream is where it was
    again = cb.on_epoch_end(trainer, 9)  # the last epoch always gets a value
    assert again["quality_fid"] == pytest.approx(out["quality_fid"], rel=1e-9)  # same model -> same number
    # an untrained energy model barely moves noise in 4 steps: its samples sit far above the real-vs-real baseline
    assert out["quality_fid"] > 3 * out["quality_fid_real_baseline"]


@pytest.mark.slow
def test_quality_callback_on_cpu_leaves_a_compiled_training_sampler_alone(clf_cache, data, tmp_path):
    path, _, _ = clf_cache
    model = CNNModel(hidden_features=8)
    compiled = LangevinSampler(model, steps=60, backend="compiled", seed=0, step_size=5.0, grad_clip=0.01)
    trainer = SimpleNamespace(
        model=model,
        sampler=compiled,
        config={"epochs": 2},
        device=torch.device("cpu"),
        out_dir=None,
        ckpt_dir=tmp_path,
        data=data,
    )
    cb = QualityCallback(every=1, n_samples=8, steps=2, classifier_config=TINY_CFG)
    assert cb.on_epoch_end(trainer, 0) is not None
    assert compiled.last_backend is None  # never called: no torch.compile during training on CPU
    assert cb._cpu_sampler.step_size == 5.0 and cb._cpu_sampler.grad_clip == 0.01
    assert (tmp_path / q.CLASSIFIER_FILENAME).is_file()  # cached next to the checkpoints, for ebmfast evaluate


def test_quality_callback_rejects_bad_arguments():
    with pytest.raises(ValueError, match="every"):
        QualityCallback(every=0)
    with pytest.raises(ValueError, match="n_samples"):
        QualityCallback(every=1, n_samples=1)
    with pytest.raises(ValueError, match="steps"):
        QualityCallback(every=1, steps=0)
