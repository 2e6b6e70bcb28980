"""Thin modules over vlfast's ops, drop-in for the modules training code already uses."""
from .contrastive import ClipLoss, SigLipLoss

__all__ = ["ClipLoss", "SigLipLoss"]
