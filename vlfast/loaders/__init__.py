"""Checkpoint loaders: other libraries' weights into vlfast's models and back (safetensors / weights_only)."""
from .checkpoint import CheckpointError
from .llama import llama_from_transformers, llama_to_transformers
from .llava import llava_from_transformers, llava_to_transformers
from .dvae import dvae_from_openai, dvae_to_openai
from .clip import ( clip_from_openai, clip_from_transformers, clip_to_openai, clip_to_transformers,
                   config_from_openai, config_from_transformers, convert_state_dict, export_state_dict,
                   OPEN_CLIP_HEAD_WIDTHS, read_state_dict, transformers_config)

__all__ = ["CheckpointError", "llama_from_transformers", "llama_to_transformers", "llava_from_transformers", "llava_to_transformers", "dvae_from_openai", "dvae_to_openai", "clip_from_transformers", "clip_from_openai", "clip_to_transformers", "clip_to_openai",
           "config_from_transformers", "config_from_openai", "transformers_config", "convert_state_dict",
           "export_state_dict", "read_state_dict", "OPEN_CLIP_HEAD_WIDTHS"]
