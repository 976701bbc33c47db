"""What must not change when the code moves: the checkpoint format (a file written by an earlier ebmfast still loads
and resumes bit-identically) and the public import paths."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from recording import TOLERANCE, recorded_here

from ebmfast.data import DataSplits, load_mnist5k
from ebmfast.training.checkpoint import load_checkpoint, load_model
from ebmfast.training.config import TrainConfig
from ebmfast.training.trainer import Trainer

FIXTURE = Path(__file__).parent / "data" / "checkpoint_v1.pt"

# tests/data/checkpoint_v1.pt was written by ebmfast 0.1.0 (commit 185461f, before the outer layers moved into
# ebmfast/training, ebmfast/evaluation and ebmfast/benchmark): this config with max_iterations=3, on the first 8
# training and 8 held-out images of mnist5k, stopped mid-epoch after iteration 3. That same code, resumed from it to
# iteration 6 (across an epoch end: validation, rand_out, grids, StepLR, checkpoints), ended with the model weights
# and replay buffer recorded in RESUMED_TO_6 (their sha256, see _digest, and per-tensor sums) on the platform recorded
# with them; an uninterrupted run to 6 gave the same digest.
RESUMED_TO_6 = json.loads((Path(__file__).parent / "data" / "checkpoint_v1_resumed_to_6.json").read_text())


def _config(max_iterations: int) -> TrainConfig:
    return TrainConfig(
        hidden_features=2,
        batch_size=2,
        sampler_steps=2,
        buffer_size=4,
        sampler_backend="eager",
        epochs=2,
        rand_out_images=4,
        val_batch_size=64,
        gen_chains=1,
        gen_steps=2,
        gen_show_every=1,
        buffer_grid_images=2,
        sample_every=1,
        tensorboard=False,
        snapshot_every=2,
        max_iterations=max_iterations,
    )


def _data() -> DataSplits:
    d = load_mnist5k()
    return DataSplits("mnist5k", d.train_images[:8], d.train_labels[:8], d.val_images[:8], d.val_labels[:8])


def _digest(trainer) -> str:
    h = hashlib.sha256()
    for name, value in trainer.model.state_dict().items():
        h.update(name.encode())
        h.update(value.detach().contiguous().numpy().tobytes())
    h.update(trainer.buffer.storage.numpy().tobytes())
    return h.hexdigest()


def _sums(trainer) -> dict[str, float]:
    sums = {n: v.detach().double().sum().item() for n, v in trainer.model.state_dict().items() if v.is_floating_point()}
    return {**sums, "buffer": trainer.buffer.storage.double().sum().item()}


def _keys(obj, prefix=""):
    """The nested key layout of a checkpoint (dict keys, recursively), without the values."""
    if isinstance(obj, dict):
        return {k for key, v in obj.items() for k in _keys(v, f"{prefix}/{key}")} | {prefix}
    return {prefix}


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_public_names():
    """``from ebmfast import ...`` keeps the engine's names and adds the outer entry points (imported on first use)."""
    import ebmfast
    from ebmfast.data import load_dataset
    from ebmfast.training.trainer import Trainer as TrainerClass

    assert ebmfast.Trainer is TrainerClass and ebmfast.TrainConfig is TrainConfig
    assert ebmfast.load_model is load_model and ebmfast.load_dataset is load_dataset
    assert {"CNNModel", "LangevinSampler", "ReplayBuffer", "langevin_reference", "BACKENDS"} <= set(ebmfast.__all__)
    assert set(ebmfast.__all__) <= set(dir(ebmfast))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ebmfast.nope  # noqa: B018


def test_old_checkpoint_loads():
    model, config = load_model(FIXTURE)
    assert model.hidden_features == 2 and not model.training
    assert config["max_iterations"] == 3 and config["buffer_size"] == 4
    ckpt = load_checkpoint(FIXTURE)
    assert ckpt["format_version"] == 1 and ckpt["ebmfast_version"] == "0.1.0"
    assert ckpt["trainer"]["iteration"] == 3


@pytest.mark.slow
def test_old_checkpoint_resumes_bit_identically(tmp_path, one_thread):
    """Resuming the old file with today's code reaches the same weights and buffer as the old code did: bit for bit on
    the platform of the recording; elsewhere float32 sums round differently, so there every tensor's sum must agree
    within 1e-5 relative (forcing AVX2 kernels moves them by 1e-7 relative)."""
    tr = Trainer(_config(6), data=_data(), device="cpu", out_dir=tmp_path / "run", resume=FIXTURE, progress=False)
    result = tr.fit()
    tr.close()
    assert (result.status, result.iteration, result.epoch) == ("max_iterations", 6, 1)
    if recorded_here(RESUMED_TO_6["platform"]):
        assert _digest(tr) == RESUMED_TO_6["digest"]
    else:
        assert _sums(tr) == pytest.approx(RESUMED_TO_6["sums"], **TOLERANCE)
    # today's checkpoint has the old file's layout, key for key, plus the config fields added since (their defaults
    # are what the old file's run did)
    new, old = _keys(load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")), _keys(load_checkpoint(FIXTURE))
    assert old <= new
    assert {k for k in new - old if not k.startswith("/config/")} == set()
