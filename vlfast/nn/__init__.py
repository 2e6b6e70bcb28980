"""Thin modules over vlfast's ops, drop-in for the modules training code already uses."""
from .attention import CrossAttention, SelfAttention
from .contrastive import ClipLoss, SigLipLoss
from .linear_cross_entropy import LinearCrossEntropy
from .quantizers import GumbelQuantizer, QuantizerOutput, VectorQuantizer
from .rotary import RotaryEmbedding

__all__ = ["SelfAttention", "CrossAttention", "RotaryEmbedding", "ClipLoss", "SigLipLoss", "LinearCrossEntropy", "VectorQuantizer", "GumbelQuantizer", "QuantizerOutput"]
