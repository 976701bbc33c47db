"""The seed-compatible PCDSampler facade (what examples/lightning_swap.py relies on)."""

import torch

from ebmfast import CNNModel
from ebmfast.pcd import PCDSampler


def test_sample_new_exmps_fills_buffer_and_follows_seed_api():
    model = CNNModel(hidden_features=8).train()
    sampler = PCDSampler(model, img_shape=(1, 28, 28), sample_size=4, max_len=16, backend="eager", seed=0)
    out = sampler.sample_new_exmps(steps=3, step_size=10)
    assert out.shape == (4, 1, 28, 28) and not out.requires_grad
    assert model.training
    stored = sampler.buffer.storage
    assert any(torch.equal(stored[i], out[0]) for i in range(len(stored)))  # written back
    traj = PCDSampler.generate_samples(
        model, torch.rand(2, 1, 28, 28) * 2 - 1, steps=4, return_img_per_step=True, backend="eager"
    )
    assert traj.shape == (4, 2, 1, 28, 28)
