"""ebmfast.recognise: models read by what they compute, and the chain program (ebmfast.energy_grad) on what it reads.

Gradients are compared in float64 against autograd on the same model (ebmfast.reference): both are the same
arithmetic in another order, so 1e-10 absolute on gradients of magnitude <= 1e-2 leaves wide headroom. Trajectories
(float32, the sampler's tolerance 1e-5 on CPU: tests/test_sampler.py explains it) run the uncompiled chain program
through the reference loop; the compiled and kernel backends run in the slow tests.
"""

from __future__ import annotations

import copy
import struct

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_verbose
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from ebmfast import LangevinSampler, langevin_reference, layers
from ebmfast.energy_grad import program_energy_grad
from ebmfast.kernels.geometry import encode_geometry
from ebmfast.layers import unsupported_reason
from ebmfast.models import CNNModel
from ebmfast.recognise import Act, Add, Affine, Program, capture_seconds, recognise
from ebmfast.reference import energy_grad_reference


def chain_grad(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    program = recognise(model, x)
    assert isinstance(program, Program), program
    return program_energy_grad(program, program.read(model), x)


def assert_grad_parity(model: nn.Module, x: torch.Tensor, what: str) -> None:
    model = model.double().eval()
    x = x.double()
    assert_close_verbose(chain_grad(model, x), energy_grad_reference(model, x), atol=1e-10, what=what)


# ------------------------------------------------------------------------------------------- the tutorial's classes
class TutorialSwish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class TutorialCNN(nn.Module):
    """The UvA tutorial's CNNModel, as a user writes it."""

    def __init__(self, hidden_features=32, out_dim=1):
        super().__init__()
        c1, c2, c3 = hidden_features // 2, hidden_features, hidden_features * 2
        self.cnn_layers = nn.Sequential(
            nn.Conv2d(1, c1, kernel_size=5, stride=2, padding=4),
            TutorialSwish(),
            nn.Conv2d(c1, c2, kernel_size=3, stride=2, padding=1),
            TutorialSwish(),
            nn.Conv2d(c2, c3, kernel_size=3, stride=2, padding=1),
            TutorialSwish(),
            nn.Conv2d(c3, c3, kernel_size=3, stride=2, padding=1),
            TutorialSwish(),
            nn.Flatten(),
            nn.Linear(c3 * 4, c3),
            TutorialSwish(),
            nn.Linear(c3, out_dim),
        )

    def forward(self, x):
        return self.cnn_layers(x).squeeze(dim=-1)


class ShortRunNet(nn.Module):
    """The short-run-MCMC style conv net: functional leaky_relu calls in forward."""

    def __init__(self, n_f=8):
        super().__init__()
        self.conv1 = nn.Conv2d(1, n_f, 3, 1, 1)
        self.conv2 = nn.Conv2d(n_f, n_f * 2, 4, 2, 1)
        self.conv3 = nn.Conv2d(n_f * 2, n_f * 4, 4, 2, 1)
        self.conv4 = nn.Conv2d(n_f * 4, 1, 4, 1, 0)

    def forward(self, x):
        h = F.leaky_relu(self.conv1(x), 0.2)
        h = F.leaky_relu(self.conv2(h), 0.2)
        h = F.leaky_relu(self.conv3(h), 0.2)
        return self.conv4(h).squeeze()


class ResBlock(nn.Module):
    def __init__(self, c_in, c_out, act):
        super().__init__()
        self.a = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.b = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.proj = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None
        self.act = act

    def forward(self, x):
        skip = x if self.proj is None else self.proj(x)
        return self.act(skip + self.b(self.act(self.a(x))))


class ResNet(nn.Module):
    """A small residual net with average pooling, batch norm, spectral norm and a global mean before the Linear."""

    def __init__(self, act=None):
        super().__init__()
        act = act or nn.SiLU()
        self.stem = spectral_norm(nn.Conv2d(1, 4, 3, padding=1))
        self.bn = nn.BatchNorm2d(4)
        self.block1 = ResBlock(4, 4, act)
        self.pool = nn.AvgPool2d(2)
        self.block2 = ResBlock(4, 8, act)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        h = self.block1(torch.tanh(self.bn(self.stem(x))))
        h = self.block2(self.pool(h))
        return self.head(h.mean(dim=(2, 3)))


def randomise_bn(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.bias.shape, generator=gen) - 0.5)
    return model


def images(n, size=28, seed=0):
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ------------------------------------------------------------------------------------------- accepted forms
class Wrapper(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return score(self.inner, x)


def score(net, x):  # a forward that calls a function
    return net(x).view(-1)


class Functional(nn.Module):
    def __init__(self, form):
        super().__init__()
        self.c = nn.Conv2d(1, 3, 3, stride=2)
        self.l = nn.Linear(3 * 13 * 13, 1)
        self.form = form

    def forward(self, x):
        h = self.c(x)
        if self.form == "method":
            h = h * h.sigmoid()
        elif self.form == "reversed":
            h = torch.sigmoid(h) * h
        else:
            h = F.silu(h)
        return self.l(torch.flatten(h, 1))


def head():
    return nn.Tanh(), nn.Linear(5, 1)


ACCEPTED = {
    "seed CNNModel": lambda: CNNModel(hidden_features=4),
    "tutorial classes": lambda: TutorialCNN(hidden_features=4),
    "Sequential (N, 1)": lambda: nn.Sequential(nn.Conv2d(1, 2, 3, 2), nn.SiLU(), nn.Flatten(), nn.Linear(338, 1)),
    "functional silu": lambda: Functional("silu"),
    "method x * x.sigmoid()": lambda: Functional("method"),
    "sigmoid(x) * x": lambda: Functional("reversed"),
    "nested and wrapped": lambda: Wrapper(nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(784, 5)), *head())),
    "short-run leaky_relu": lambda: ShortRunNet(),
    "residual": lambda: randomise_bn(ResNet()),
}  # fmt: skip


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_accepted_forms_are_read_and_their_gradient_is_autograds(name):
    torch.manual_seed(0)
    model = ACCEPTED[name]()
    x = images(3, 16 if name == "short-run leaky_relu" else 28)
    program = recognise(model.eval(), x)
    assert isinstance(program, Program), program
    assert_grad_parity(model, x, name)


def test_what_the_tutorial_model_is_read_as():
    program = recognise(TutorialCNN(), images(2))
    kinds = [type(n).__name__ + (f":{n.name}" if isinstance(n, Act) else "") for n in program.nodes]
    assert kinds == ["Affine", "Act:swish"] * 4 + ["Reshape", "Affine", "Act:swish", "Affine", "Reshape"]
    assert [n.weight for n in program.nodes if isinstance(n, Affine)][:2] == [
        "cnn_layers.0.weight",
        "cnn_layers.2.weight",
    ]
    assert program.shapes[-1] == ()  # squeezed to (N,)


def test_foldings_and_dag():
    program = recognise(randomise_bn(ResNet()), images(2, 8))
    affine = [n for n in program.nodes if isinstance(n, Affine)]
    assert affine[0].bn is not None and affine[0].weight == "stem.weight"  # spectral norm: the effective weight
    assert any(n.pool == (2, 2) and n.kernel == (6, 6) and n.stride == (2, 2) for n in affine)  # pool into a conv
    assert affine[-1].global_pool and not affine[-1].conv
    assert sum(isinstance(n, Add) for n in program.nodes) == 2


ACTS = [
    (nn.Identity(), "no act"),
    (TutorialSwish(), "swish"),
    (nn.Tanh(), "tanh"),
    (nn.ReLU(), "relu"),
    (nn.LeakyReLU(0.3), "leaky_relu"),
    (nn.ELU(0.7), "elu"),
    (nn.Softplus(beta=2.0), "softplus"),
    (nn.GELU(), "gelu"),
    (nn.GELU(approximate="tanh"), "gelu_tanh"),
    (nn.Sigmoid(), "sigmoid"),
]


@pytest.mark.parametrize("act, name", ACTS, ids=[a[1] for a in ACTS])
def test_every_activation_one_step_gradient(act, name):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, 2, 1), act, nn.Flatten(), nn.Linear(3 * 4 * 4, 4), act, nn.Linear(4, 1))
    x = images(5, 7) * 3  # both sides of every kink, and softplus beyond its threshold
    found = recognise(model.eval(), x)
    names = [n.name for n in found.nodes if isinstance(n, Act)]
    assert names == ([] if name == "no act" else [name, name])
    assert_grad_parity(model, x, name)


@pytest.mark.parametrize("act", [nn.Tanh(), nn.GELU(), nn.ELU()], ids=["tanh", "gelu", "elu"])
def test_residual_dag_one_step_gradient(act):
    torch.manual_seed(2)
    assert_grad_parity(randomise_bn(ResNet(act)), images(3, 8), f"residual {act}")


@pytest.mark.parametrize(
    "make", [lambda: TutorialCNN(8), lambda: randomise_bn(ResNet(nn.SiLU()))], ids=["tutorial", "residual"]
)
def test_trajectory_parity_smooth_activations(make):
    torch.manual_seed(4)
    model = make().eval()
    x = images(3, 28)
    noise = torch.randn(20, *x.shape, generator=torch.Generator().manual_seed(5))
    program = recognise(model, x)

    def grad(x):
        return program_energy_grad(program, program.read(model), x)

    want = langevin_reference(model, x, 20, noise=noise)
    got = langevin_reference(model, x, 20, noise=noise, energy_grad=grad)
    assert_close_verbose(got, want, atol=1e-5, what="20-step trajectory")


# ------------------------------------------------------------------------------------------- refused forms
class Pow(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 1)

    def forward(self, x):
        return self.l(x**2)


class Matmul(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 1))

    def forward(self, x):
        return x @ self.w


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 1)

    def forward(self, x):
        return self.l(x) if x.sum() > 0 else -self.l(x)


class Detached(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 1)

    def forward(self, x):
        return self.l(x) + self.l(x.detach())  # no gradient through the second term: not the identity


def conv_net(*mid, c=2, k=3, pad=0, mode="zeros", dil=1, hw=26, hook_sn=False):
    conv = nn.Conv2d(1, c, k, padding=pad, padding_mode=mode, dilation=dil)
    conv = nn.utils.spectral_norm(conv) if hook_sn else conv
    return nn.Sequential(conv, *mid, nn.Flatten(), nn.Linear(c * hw * hw, 1))


REFUSED = [
    (Pow, (4,), "aten.pow"),
    (Matmul, (4,), "aten.matmul"),
    (DataDependent, (4,), "could not be captured"),
    (Detached, (4,), "aten.detach"),
    (lambda: conv_net(dil=2, hw=24), (1, 28, 28), "dilation"),
    (lambda: nn.Sequential(nn.Linear(4, 2)), (4,), "one score per sample"),
    (lambda: conv_net(nn.AvgPool2d(2), nn.Tanh(), hw=13), (1, 28, 28), "avg_pool2d"),
    (lambda: conv_net(pad=1, mode="reflect", hw=28), (1, 28, 28), "pad"),
    (lambda: conv_net(hook_sn=True), (1, 28, 28), "hook-based torch.nn.utils.spectral_norm"),
    (lambda: nn.Sequential(nn.Linear(4, 3), nn.Softplus(threshold=10), nn.Linear(3, 1)), (4,), "threshold 10"),
]  # fmt: skip


@pytest.mark.parametrize("make, shape, match", REFUSED, ids=[r[2] for r in REFUSED])
def test_refused_forms_name_the_op(make, shape, match):
    reason = recognise(make(), torch.zeros(2, *shape))
    assert isinstance(reason, str) and match in reason, reason


def test_a_failed_capture_prints_nothing(capfd):
    """A forward torch.export cannot capture is a reason, not a graph dump on the user's terminal (export prints the
    partial graph to stderr on a data-dependent branch)."""
    assert "could not be captured" in recognise(DataDependent(), torch.zeros(2, 4))
    out, err = capfd.readouterr()
    assert "def forward" not in out + err, err[-500:]


def test_kernel_reasons_for_what_the_kernels_lack(monkeypatch):
    monkeypatch.setenv("EBMFAST_TRITON_ON_CPU", "1")
    assert unsupported_reason(ShortRunNet(), images(2, 16)) is None  # its final 4x4 conv runs as a dense layer
    assert unsupported_reason(TutorialCNN(), images(2)) is None
    assert "more than one layer" in unsupported_reason(ResNet(), images(2, 8))  # block2's projection shortcut


class PlainResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.a, self.b = (
            nn.Conv2d(1, 4, 3, 2, 1),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.Conv2d(4, 4, 3, padding=1),
        )
        self.head = nn.Linear(4 * 4 * 4, 1)

    def forward(self, x):
        h = F.silu(self.stem(x))
        h = F.silu(h + self.b(F.silu(self.a(h))))
        return self.head(h.flatten(1))


class StemResidual(nn.Module):
    """A residual add from the chain state x (the first conv's input): a shape the kernels refuse."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 1, 3, padding=1), nn.Conv2d(1, 1, 3, padding=1)
        self.head = nn.Linear(64, 1)

    def forward(self, x):
        return self.head(torch.tanh(x + self.b(torch.tanh(self.a(x)))).flatten(1))


def test_residual_adds_lower_to_the_kernels_residual_source():
    chain = layers.kernel_chain(recognise(PlainResidual(), images(2, 8)))
    assert chain.residual == (-1, -1, 1, -1)  # z of layer 2 (conv b) gets the input of layer 1 (conv a)
    assert [s.res_src for s in chain.specs] == [-1, -1, 1, -1]
    projected = nn.Sequential(ResBlock(1, 4, nn.SiLU()), nn.Flatten(), nn.Linear(4 * 4 * 4, 1))
    reason = layers.kernel_chain(recognise(projected, images(2, 4)))
    assert isinstance(reason, str) and "more than one layer" in reason, reason  # the shortcut's 1x1 conv


def test_a_residual_shape_the_kernels_refuse_is_a_reason_not_an_error(monkeypatch):
    monkeypatch.setenv("EBMFAST_TRITON_ON_CPU", "1")
    x = images(2, 8)
    reason = unsupported_reason(StemResidual(), x)  # kernels.geometry.residual_reason, before any launch
    assert "residual add from the chain state x" in reason, reason
    with pytest.raises(ValueError, match="backend='triton' cannot run this model.*residual add from the chain state"):
        LangevinSampler(StemResidual(), backend="triton").explain(x)


@pytest.mark.parametrize(
    "act, code, value",
    [(nn.LeakyReLU(0.2), 4, 0.2), (nn.ELU(0.7), 5, 0.7), (nn.Softplus(beta=1.3), 6, 1.3), (nn.Tanh(), 2, 0.0)],
    ids=["leaky_relu", "elu", "softplus", "tanh"],
)
def test_activation_parameters_reach_the_kernels_as_float32_bits(act, code, value):
    chain = layers.kernel_chain(recognise(nn.Sequential(nn.Linear(4, 3), act, nn.Linear(3, 1)), torch.zeros(2, 4)))
    first, last = chain.specs
    bits = struct.unpack("<i", struct.pack("<f", value))[0]  # the float32 pattern, written here independently
    assert (first.out_act, first.out_act_param) == (code, bits) and (last.in_act, last.in_act_param) == (code, bits)
    assert first.out_act_value == torch.tensor(value, dtype=torch.float32).item()


def test_explain_and_the_kernel_error_give_the_reason(monkeypatch):
    monkeypatch.setenv("EBMFAST_TRITON_ON_CPU", "1")
    x = torch.zeros(2, 4)
    assert "aten.pow" in LangevinSampler(Pow(), backend="auto").explain(x)
    assert "the chain program of" in LangevinSampler(TutorialCNN(4), backend="auto").explain(images(2))
    with pytest.raises(ValueError, match="backend='triton' cannot run this model.*aten.pow"):
        LangevinSampler(Pow(), backend="triton", steps=1).sample(x)


# ------------------------------------------------------------------------------------------- changes after capture
def test_a_model_changed_after_its_first_call_is_recaptured():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.LeakyReLU(0.1), nn.Flatten(), nn.Linear(2 * 5 * 5, 1)).eval()
    x = images(2, 7)
    first = recognise(model, x)
    assert recognise(model, x) is first  # cached
    model[1].negative_slope = 0.4  # a hyperparameter
    assert recognise(model, x).nodes[1].param == 0.4
    model[1] = nn.Tanh()  # a submodule replaced
    assert recognise(model, x).nodes[1].name == "tanh"
    model.append(nn.Sigmoid())  # a submodule added
    assert isinstance(recognise(model, x).nodes[-1], Act)
    assert_grad_parity(model, x, "after the changes")


def test_the_sampler_chooses_again_for_a_changed_model(monkeypatch):
    monkeypatch.setenv("EBMFAST_TRITON_ON_CPU", "1")
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))
    sampler = LangevinSampler(model, backend="triton")
    x = torch.zeros(2, 4)
    assert sampler.explain(x).endswith("-> 'triton' for x of shape (2, 4) on cpu: asked for")
    model[2] = nn.Sequential(nn.Tanh(), nn.GELU())  # two activations in a row: not run by the kernels
    with pytest.raises(ValueError, match="two activations in a row"):
        sampler.explain(x)


def test_parameters_are_read_from_the_live_model():
    torch.manual_seed(7)
    model = TutorialCNN(4).eval()
    x = images(2)
    program = recognise(model, x)
    with torch.no_grad():
        model.cnn_layers[0].weight.mul_(-2.0)  # in place, as an optimizer does
    assert_close_verbose(chain_grad(model, x), energy_grad_reference(model, x), atol=1e-9, what="in place")
    model.cnn_layers[2].weight = nn.Parameter(model.cnn_layers[2].weight.detach() * 3.0)  # replaced
    assert recognise(model, x) is program  # same structure: no re-capture
    assert_close_verbose(chain_grad(model, x), energy_grad_reference(model, x), atol=1e-9, what="replaced")


def test_capture_cost_is_recorded():
    before = len(capture_seconds())
    recognise(TutorialCNN(2), images(1))
    assert len(capture_seconds()) == before + 1 and capture_seconds()[-1] > 0


# ------------------------------------------------------------------------------------------- drop-in models, kernels
class PooledResNet(nn.Module):
    """A small residual net as users write one: AvgPool2d before a conv, an identity-shortcut residual block, a global
    mean before the Linear."""

    def __init__(self, act=None):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.block = ResBlock(6, 6, act or nn.SiLU())
        self.head = nn.Linear(6, 1)

    def forward(self, x):
        h = F.silu(self.conv(self.pool(F.silu(self.stem(x)))))
        return self.head(self.block(h).mean(dim=(2, 3)))


# (model, image size, steps). Float32 trajectories on CPU: the kernels sum in another order than torch, so states
# differ by rounding (measured below 1e-6 here, also after 20 steps of each net); the sampler's tolerance 1e-5
# (tests/test_sampler.py) leaves room. LeakyReLU's kinks could flip a unit's branch under another summation order
# (an O(step_size * slope gap) jump), so the short-run net runs few steps; the smooth nets run more.
DROPIN = {
    "tutorial": (lambda: TutorialCNN(8), 28, 10),
    "short-run leaky_relu": (ShortRunNet, 16, 4),
    "residual pooled": (PooledResNet, 8, 20),
}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["triton", "persistent"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", list(DROPIN))
def test_dropin_models_on_the_kernel_backends(monkeypatch, name, backend, batch):
    """The tutorial model, a short-run-MCMC net and a pooled residual net run on the kernels (no fallback: the
    backend asked for is the one used) with the reference's trajectory under the same noise."""
    monkeypatch.setenv("EBMFAST_TRITON_ON_CPU", "1")
    make, size, steps = DROPIN[name]
    torch.manual_seed(8)
    model = make()
    x = images(batch, size)
    sampler = LangevinSampler(model, steps=steps, backend=backend, seed=9)
    if isinstance(model, ShortRunNet) and batch == 1:  # .squeeze() drops a batch of one: refused, with the reason
        with pytest.raises(ValueError, match=r"squeeze in the model \(ShortRunNet\) changes the batch dimension"):
            sampler.explain(x)
        return
    assert f"-> {backend!r}" in sampler.explain(x)
    noise = sampler.noise_stream(x)
    got = sampler.sample(x)
    assert sampler.last_backend == backend
    assert_close_verbose(got, langevin_reference(model, x, steps, noise=noise), atol=1e-5, what=f"{name} {backend}")


@pytest.mark.slow
def test_tutorial_model_with_batch_norm_on_the_layer_kernels(monkeypatch):
    monkeypatch.setenv("EBMFAST_TRITON_ON_CPU", "1")
    torch.manual_seed(8)
    model = TutorialCNN(4)
    model.cnn_layers.insert(1, randomise_bn(nn.BatchNorm2d(2)))  # folded into the first conv
    x = images(3)
    sampler = LangevinSampler(model, steps=2, backend="triton", seed=9)
    noise = sampler.noise_stream(x)
    got = sampler.sample(x)
    assert sampler.last_backend == "triton"
    assert_close_verbose(got, langevin_reference(model, x, 2, noise=noise), atol=1e-5, what="batch norm folded")


def kernel_grad_parity(model: nn.Module, x: torch.Tensor, what: str) -> None:
    """The layer kernels' float32 gradient against autograd's float64 one: float32 rounding of sums of up to a few
    hundred terms, relative 1e-5 of the gradient's largest entry."""
    model = model.eval()
    want = energy_grad_reference(copy.deepcopy(model).double(), x.double())
    got = layers.layer_program(model).energy_grad(x)
    assert_close_verbose(got.double(), want, atol=1e-5 * want.abs().max().item(), what=what)


def one_step_parity(model: nn.Module, x: torch.Tensor, backend: str, what: str) -> None:
    """One sampler step on ``backend`` against the reference step with the same noise (no clip reached: the step
    is the gradient's)."""
    sampler = LangevinSampler(model, steps=1, backend=backend, seed=16, grad_clip=1e9)
    noise = sampler.noise_stream(x)
    got = sampler.sample(x)
    assert sampler.last_backend == backend
    want = langevin_reference(model, x, 1, noise=noise, grad_clip=1e9)
    assert_close_verbose(got, want, atol=1e-5, what=f"{what} {backend}")


@pytest.mark.parametrize("act, name", ACTS, ids=[a[1] for a in ACTS])
def test_every_activation_one_step_on_the_kernels(monkeypatch, act, name):
    monkeypatch.setenv("EBMFAST_TRITON_ON_CPU", "1")
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, 2, 1), act, nn.Flatten(), nn.Linear(3 * 4 * 4, 4), act, nn.Linear(4, 1))
    x = images(5, 7) * 3  # both sides of every kink, and softplus beyond its threshold
    kernel_grad_parity(model, x, name)
    for backend in ("triton", "persistent"):
        one_step_parity(model, x, backend, name)


@pytest.mark.parametrize("act", [nn.Tanh(), nn.GELU(), nn.ELU(0.7)], ids=["tanh", "gelu", "elu"])
def test_residual_dag_one_step_on_the_kernels(monkeypatch, act):
    monkeypatch.setenv("EBMFAST_TRITON_ON_CPU", "1")
    torch.manual_seed(2)
    model, x = PooledResNet(act), images(3, 8)
    kernel_grad_parity(model, x, f"residual {act}")
    for backend in ("triton", "persistent"):
        one_step_parity(model, x, backend, f"residual {act}")


@pytest.mark.slow
def test_dropin_models_compile_for_hopper():
    """The layer kernels of the three drop-in models (batch 3, fp32) compile for sm_90 without a GPU
    (tests/test_layers.py's compile job: a subprocess without the interpreter)."""
    from test_layers import compile_job

    chains = []
    for make, size, _ in DROPIN.values():
        shape = (1, size, size)
        chains.append([encode_geometry(layers.plan_layers(make(), shape)), shape, [3]])
    print(f"HOPPER COMPILE drop-in {compile_job({'chains': chains, 'layers': encode_geometry([]), 'precisions': [0]})}")


# ------------------------------------------------------------------------------------------- fast backends (slow)
@pytest.mark.slow
@pytest.mark.parametrize(
    "make",
    [lambda: TutorialCNN(8), ShortRunNet, lambda: randomise_bn(ResNet())],
    ids=["tutorial", "short-run", "residual"],
)
def test_compiled_backend_runs_the_chain_program(make):
    torch.manual_seed(10)
    model = make()
    x = images(3, 16 if isinstance(model, ShortRunNet) else 28)
    sampler = LangevinSampler(model, steps=5, backend="compiled", seed=11)
    assert "the chain program of" in sampler.explain(x)
    noise = sampler.noise_stream(x)
    got = sampler.sample(x)
    assert_close_verbose(got, langevin_reference(model, x, 5, noise=noise), atol=1e-5, what="compiled")


class PooledChain(nn.Module):
    """Average pooling into a conv, a global mean into the final Linear, a spectral-normalised conv, batch norm."""

    def __init__(self):
        super().__init__()
        self.c1 = spectral_norm(nn.Conv2d(1, 4, 3, padding=1))
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 6, 3, stride=1, padding=1)
        self.head = nn.Linear(6, 1)

    def forward(self, x):
        h = F.silu(self.bn(self.c1(x)))
        h = torch.tanh(self.c2(F.avg_pool2d(h, 2)))
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1)).squeeze(-1)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["triton", "persistent"])
def test_folded_pooling_and_norms_on_the_kernel_backends(monkeypatch, backend):
    monkeypatch.setenv("EBMFAST_TRITON_ON_CPU", "1")
    torch.manual_seed(12)
    model = randomise_bn(PooledChain())
    x = images(3, 8)
    sampler = LangevinSampler(model, steps=3, backend=backend, seed=13)
    noise = sampler.noise_stream(x)
    got = sampler.sample(x)
    assert sampler.last_backend == backend
    assert_close_verbose(got, langevin_reference(model, x, 3, noise=noise), atol=1e-5, what=backend)


def every_activation_mlp():
    layers = [nn.Flatten(), nn.Linear(49, 6)]
    for act, _ in ACTS:
        layers += [act, nn.Linear(6, 6)]
    return nn.Sequential(*layers[:-1], nn.Linear(6, 1))


@pytest.mark.slow
def test_compiled_chain_program_with_every_activation():
    torch.manual_seed(14)
    model = every_activation_mlp()
    x = images(5, 7)
    sampler = LangevinSampler(model, steps=4, backend="compiled", seed=15)
    text = sampler.explain(x)
    assert all(name in text for _, name in ACTS[1:]), text
    noise = sampler.noise_stream(x)
    got = sampler.sample(x)
    assert_close_verbose(got, langevin_reference(model, x, 4, noise=noise), atol=1e-5, what="every activation")
