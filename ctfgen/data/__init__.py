from .codes import CodeDataset
from .datasets import DataError, build_dataset
from .transforms import ImageTransform, image_grid

__all__ = ["CodeDataset", "DataError", "ImageTransform", "build_dataset", "image_grid"]
