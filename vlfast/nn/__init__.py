"""Thin modules over vlfast's ops, drop-in for the modules training code already uses."""
from .attention import CrossAttention, SelfAttention
from .contrastive import ClipLoss, SigLipLoss
from .linear_cross_entropy import LinearCrossEntropy
from .quantizers import GumbelQuantizer, QuantizerOutput, VectorQuantizer
from .rmsnorm import RMSNorm
from .rotary import LlamaRotaryEmbedding, RotaryEmbedding

__all__ = ["SelfAttention", "CrossAttention", "RotaryEmbedding", "LlamaRotaryEmbedding", "RMSNorm", "ClipLoss", "SigLipLoss", "LinearCrossEntropy", "VectorQuantizer", "GumbelQuantizer", "QuantizerOutput"]
