"""Build script.

Deliberately does not import torch: pip's build isolation often has no torch, and the optional
CUDA extension (vlfast._C, see CMakeLists.txt and csrc/) links only the CUDA runtime and pybind11.
Package metadata lives in pyproject.toml.
"""
from setuptools import setup

setup()
