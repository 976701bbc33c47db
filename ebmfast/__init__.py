"""ebmfast: fast, trustworthy Langevin sampling and contrastive-divergence training for deep EBMs.

Data path: ``data`` -> ``train`` (trainer) -> ``buffer`` (replay buffer) -> ``sampler`` (LangevinSampler)
-> ``energy_grad`` (eager / compiled gradient) + ``ops`` (fused update op) -> ``kernels.langevin`` (Triton).
The eager reference sampler is ``ebmfast.reference.langevin_reference``.
"""

from .buffer import ReplayBuffer
from .models import CNNModel, Swish
from .reference import langevin_reference
from .sampler import BACKENDS, LangevinSampler

__version__ = "0.1.0"

__all__ = ["CNNModel", "Swish", "LangevinSampler", "ReplayBuffer", "langevin_reference", "BACKENDS", "__version__"]
