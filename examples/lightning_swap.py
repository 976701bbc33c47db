"""The seed tutorial's Lightning module with ebmfast's sampler swapped in (an example, not a dependency).

Needs `pip install lightning` (or pytorch_lightning). The only changes from the tutorial are the three import lines
marked `# ebmfast`; the module body is the tutorial's, because PCDSampler keeps the seed's Sampler API.
Run: python examples/lightning_swap.py  (one epoch on the embedded 5,000-image MNIST subset;
EBMFAST_EXAMPLE_BATCHES=N limits it to N batches).
"""

import os

import torch
import torch.nn.functional as F  # noqa: F401  (the tutorial imports it)

try:
    import lightning.pytorch as pl
except ImportError:  # older installs
    import pytorch_lightning as pl

from ebmfast import CNNModel  # ebmfast: the seed's CNN (or keep your own class)
from ebmfast.data import load_dataset  # ebmfast: offline data (or keep torchvision's MNIST)
from ebmfast.pcd import PCDSampler as Sampler  # ebmfast: was `class Sampler: ...` in the tutorial


class DeepEnergyModel(pl.LightningModule):
    def __init__(self, img_shape, batch_size, alpha=0.1, lr=1e-4, beta1=0.0, **CNN_args):
        super().__init__()
        self.save_hyperparameters()
        self.cnn = CNNModel(**CNN_args)
        self.sampler = Sampler(self.cnn, img_shape=img_shape, sample_size=batch_size)
        self.example_input_array = torch.zeros(1, *img_shape)

    def forward(self, x):
        return self.cnn(x)

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr, betas=(self.hparams.beta1, 0.999))
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.97)
        return [optimizer], [scheduler]

    def training_step(self, batch, batch_idx):
        real_imgs, _ = batch
        small_noise = torch.randn_like(real_imgs) * 0.005
        real_imgs = (real_imgs + small_noise).clamp(min=-1.0, max=1.0)
        fake_imgs = self.sampler.sample_new_exmps(steps=60, step_size=10)
        inp_imgs = torch.cat([real_imgs, fake_imgs], dim=0)
        real_out, fake_out = self.cnn(inp_imgs).chunk(2, dim=0)
        reg_loss = self.hparams.alpha * (real_out**2 + fake_out**2).mean()
        cdiv_loss = fake_out.mean() - real_out.mean()
        loss = reg_loss + cdiv_loss
        self.log("loss", loss)
        self.log("metrics_avg_real", real_out.mean())
        self.log("metrics_avg_fake", fake_out.mean())
        return loss


if __name__ == "__main__":
    data = load_dataset("mnist5k")
    train_set = torch.utils.data.TensorDataset(data.train_images, data.train_labels)
    loader = torch.utils.data.DataLoader(train_set, batch_size=128, shuffle=True, drop_last=True)
    model = DeepEnergyModel(img_shape=(1, 28, 28), batch_size=128)
    pl.Trainer(
        max_epochs=1,
        limit_train_batches=int(os.environ.get("EBMFAST_EXAMPLE_BATCHES", "35")),
        gradient_clip_val=0.1,
        logger=False,
        enable_checkpointing=False,
    ).fit(model, loader)
