"""Models built from vlfast's ops: pure nn.Modules, no I/O (checkpoints: vlfast.loaders)."""
from .clip import CLIP, PRESETS, CLIPConfig, TextConfig, VisionConfig
from .dalle import DALLE, DALLEConfig
from .dvae import DiscreteVAE, DiscreteVAEConfig
from .llama import Llama, LlamaConfig
from .llava import LLaVA, LlavaConfig
from .zero_shot import ZeroShotClassifier, zero_shot_weights

__all__ = ["CLIP", "CLIPConfig", "VisionConfig", "TextConfig", "PRESETS", "Llama", "LlamaConfig", "DiscreteVAE", "DiscreteVAEConfig", "DALLE", "DALLEConfig", "LLaVA", "LlavaConfig", "ZeroShotClassifier", "zero_shot_weights"]
