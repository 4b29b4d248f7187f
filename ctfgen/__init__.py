"""ctfgen: class-conditional autoregressive image generation with coarse-to-fine token prediction."""

from .errors import CtfgenError, Stopped
from .hierarchy import Hierarchy, build_hierarchy, load_hierarchy, save_hierarchy
from .pipeline import BaselinePipeline, CTFPipeline, PipelineOutput, load_pipeline
from .sampling import StageSettings, sample_baseline, sample_ctf
from .tokenizer.model import VQConfig, VQTokenizer, load_tokenizer, save_tokenizer
from .transformer import Transformer, TransformerConfig, load_model, save_model

__version__ = "0.1.0"
__all__ = [
    "BaselinePipeline", "CTFPipeline", "CtfgenError", "Hierarchy", "PipelineOutput", "StageSettings", "Transformer",
    "TransformerConfig", "VQConfig", "VQTokenizer", "build_hierarchy", "load_hierarchy", "load_model",
    "load_pipeline", "load_tokenizer", "sample_baseline", "sample_ctf", "save_hierarchy", "save_model",
    "save_tokenizer", "Stopped",
]
