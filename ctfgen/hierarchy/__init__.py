"""Codebook hierarchy: coarse labels by clustering the codewords, the artifact that stores them,
the redundancy test and the automatic choice of K. See docs/hierarchy.md."""

from .artifact import Hierarchy, check_compatible, load_hierarchy, save_hierarchy
from .auto_k import AutoK, choose_k
from .build import build_hierarchy
from .cluster import METHODS, Clustering, cluster_codebook
from .redundancy import analyze_redundancy, write_redundancy_report

__all__ = [
    "AutoK",
    "Clustering",
    "Hierarchy",
    "METHODS",
    "analyze_redundancy",
    "build_hierarchy",
    "check_compatible",
    "choose_k",
    "cluster_codebook",
    "load_hierarchy",
    "save_hierarchy",
    "write_redundancy_report",
]
