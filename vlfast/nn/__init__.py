"""Thin modules over vlfast's ops, drop-in for the modules training code already uses."""
from .contrastive import ClipLoss, SigLipLoss
from .linear_cross_entropy import LinearCrossEntropy
from .quantizers import GumbelQuantizer, QuantizerOutput, VectorQuantizer

__all__ = ["ClipLoss", "SigLipLoss", "LinearCrossEntropy", "VectorQuantizer", "GumbelQuantizer", "QuantizerOutput"]
