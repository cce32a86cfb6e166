"""Triton kernels of pymaml, installed as ``pymaml.kernels``.

The source folder is the top-level ``kernels/`` of the repository; pyproject.toml (wheel.packages)
maps it into the package because a top-level package named ``kernels`` already exists on PyPI.
"""
