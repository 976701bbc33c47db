"""The UvA tutorial "Deep Energy-Based Generative Models", its own model and sampler classes, switched to ebmfast in
two lines (marked `# ebmfast`), with the measured speed-up printed.

The model and the sampling loop below are written the way the tutorial writes them (its own `Swish`, its own
`CNNModel` whose forward is `self.cnn_layers(x).squeeze(dim=-1)`, `Sampler.generate_samples`). ebmfast reads the
model by what it computes (`ebmfast.recognise`), so the tutorial's classes run on the same fast chain program as
`ebmfast.CNNModel`; `sampler.explain(x)` says what runs and why.

Run: python examples/tutorial_switch.py [--batch 128] [--steps 60] [--rounds 5]
Times: median of interleaved rounds, the order rotated each round (tutorial loop, ebmfast on the tutorial's
classes, ebmfast.CNNModel holding the same weights), after a warm-up; the warm-up (torch.compile) is reported
separately (on CPU it includes auto's one timing of the compiled gradient against eager autograd).
"""

import argparse
import statistics
import time

import torch
import torch.nn as nn

import ebmfast  # ebmfast
from ebmfast.benchmark.timing import rotations


# ------------------------------------------------------------------------------------------ the tutorial's code
class Swish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class CNNModel(nn.Module):
    def __init__(self, hidden_features=32, out_dim=1, **kwargs):
        super().__init__()
        c_hid1 = hidden_features // 2
        c_hid2 = hidden_features
        c_hid3 = hidden_features * 2
        self.cnn_layers = nn.Sequential(
            nn.Conv2d(1, c_hid1, kernel_size=5, stride=2, padding=4),  # [16x16]
            Swish(),
            nn.Conv2d(c_hid1, c_hid2, kernel_size=3, stride=2, padding=1),  # [8x8]
            Swish(),
            nn.Conv2d(c_hid2, c_hid3, kernel_size=3, stride=2, padding=1),  # [4x4]
            Swish(),
            nn.Conv2d(c_hid3, c_hid3, kernel_size=3, stride=2, padding=1),  # [2x2]
            Swish(),
            nn.Flatten(),
            nn.Linear(c_hid3 * 4, c_hid3),
            Swish(),
            nn.Linear(c_hid3, out_dim),
        )

    def forward(self, x):
        x = self.cnn_layers(x).squeeze(dim=-1)
        return x


def generate_samples(model, inp_imgs, steps=60, step_size=10, return_img_per_step=False):
    """The tutorial's Sampler.generate_samples."""
    is_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad = False
    inp_imgs.requires_grad = True
    had_gradients_enabled = torch.is_grad_enabled()
    torch.set_grad_enabled(True)
    noise = torch.randn(inp_imgs.shape, device=inp_imgs.device)
    imgs_per_step = []
    for _ in range(steps):
        noise.normal_(0, 0.005)
        inp_imgs.data.add_(noise.data)
        inp_imgs.data.clamp_(min=-1.0, max=1.0)
        out_imgs = -model(inp_imgs)
        out_imgs.sum().backward()
        inp_imgs.grad.data.clamp_(-0.03, 0.03)
        inp_imgs.data.add_(-step_size * inp_imgs.grad.data)
        inp_imgs.grad.detach_()
        inp_imgs.grad.zero_()
        inp_imgs.data.clamp_(min=-1.0, max=1.0)
        if return_img_per_step:
            imgs_per_step.append(inp_imgs.clone().detach())
    for p in model.parameters():
        p.requires_grad = True
    model.train(is_training)
    torch.set_grad_enabled(had_gradients_enabled)
    return torch.stack(imgs_per_step, dim=0) if return_img_per_step else inp_imgs


# ------------------------------------------------------------------------------------------ the switch and timing
def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = CNNModel()
    x = torch.rand(args.batch, 1, 28, 28) * 2 - 1

    sampler = ebmfast.LangevinSampler(model, steps=args.steps, step_size=10)  # ebmfast
    # imgs = sampler.sample(x)   instead of   imgs = generate_samples(model, x.clone(), steps=..., step_size=10)

    seed_cnn = ebmfast.CNNModel()
    seed_cnn.load_state_dict(model.state_dict())  # the same weights in ebmfast's own class
    seed_sampler = ebmfast.LangevinSampler(seed_cnn, steps=args.steps, step_size=10)

    runs = {
        "tutorial loop": lambda: generate_samples(model, x.clone(), steps=args.steps, step_size=10),
        "ebmfast, tutorial classes": lambda: sampler.sample(x),
        "ebmfast, ebmfast.CNNModel": lambda: seed_sampler.sample(x),
    }
    for name, run in runs.items():  # warm-up: compiles the chain program
        t0 = time.perf_counter()
        run()
        print(f"warm-up {name}: {time.perf_counter() - t0:.1f} s")
    for s in (sampler, seed_sampler):  # after the first call: auto's choice on CPU is timed there
        print(s.explain(x))
    times = {name: [] for name in runs}
    names = list(runs)
    for order in rotations(names, args.rounds):  # interleaved, the order rotated every round
        for name in order:
            t0 = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    base = med["tutorial loop"]
    for name, t in med.items():
        print(f"{name:28s} {1e3 * t / args.steps:7.2f} ms/step   {base / t:5.2f}x the tutorial loop")
    ratio = med["ebmfast, ebmfast.CNNModel"] / med["ebmfast, tutorial classes"]
    print(f"tutorial classes vs ebmfast.CNNModel on ebmfast: {ratio:.2f}x")


if __name__ == "__main__":
    main()
