"""Evaluation metrics (FID, IS, precision/recall) over pluggable feature extractors."""

from .features import (DEFAULT_EXTRACTOR, FeatureExtractor, extract_features, extractor_names, get_extractor,
                       metric_label, register_extractor)
from .fid import (RefStats, evaluate_features, evaluate_images, feature_stats, frechet_distance, inception_score,
                  precision_recall, reference_stats)

__all__ = ["DEFAULT_EXTRACTOR", "FeatureExtractor", "RefStats", "evaluate_features", "evaluate_images",
           "extract_features", "extractor_names", "feature_stats", "frechet_distance", "get_extractor",
           "inception_score", "metric_label", "precision_recall", "reference_stats", "register_extractor"]
