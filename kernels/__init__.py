"""Triton kernel sources. Installed as ``ebmfast.kernels`` (never as a top-level ``kernels`` module).

Import only where Triton is available; ``ebmfast.ops`` guards the import and registers the torch ops.
"""
