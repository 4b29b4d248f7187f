from .model import VQConfig, VQTokenizer, load_tokenizer, save_tokenizer
from .presets import PRESETS, preset_config

__all__ = ["PRESETS", "VQConfig", "VQTokenizer", "load_tokenizer", "preset_config", "save_tokenizer"]
