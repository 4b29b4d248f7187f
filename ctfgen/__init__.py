"""ctfgen: class-conditional autoregressive image generation with coarse-to-fine token prediction."""

from .tokenizer.model import VQConfig, VQTokenizer, load_tokenizer, save_tokenizer

__version__ = "0.1.0"
__all__ = ["VQConfig", "VQTokenizer", "load_tokenizer", "save_tokenizer"]
