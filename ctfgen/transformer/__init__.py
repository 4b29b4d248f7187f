"""The Llama-style transformer used as coarse AR model, baseline AR model and refiner."""

from ctfgen.transformer.llamagen import import_llamagen_gpt
from ctfgen.transformer.model import (
    MODEL_SIZES,
    KVCache,
    Transformer,
    TransformerConfig,
    build_model,
    cluster_members,
    load_model,
    mask_to_clusters,
    preset_config,
    save_model,
)

__all__ = [
    "MODEL_SIZES", "KVCache", "Transformer", "TransformerConfig", "build_model", "cluster_members", "import_llamagen_gpt",
    "load_model", "mask_to_clusters", "preset_config", "save_model",
]
