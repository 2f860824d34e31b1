"""Class-agnostic region masks: a registry of mask generators (SAM 2, SAM) and user-supplied masks
(docs/masks.md). Importing this fills the registry without importing ``sam2`` or ``segment_anything``."""
from . import sam, sam2  # noqa: F401  (register their variants)
from .amg import AutomaticMasks
from .base import (
    MASK_GENERATORS,
    MaskGenerator,
    MaskGeneratorCfg,
    create_mask_generator,
    describe_mask_generators,
    get_mask_generator_cfg,
    list_mask_generators,
    register_mask_generator,
)
from .inputs import (
    MASK_FILE_SUFFIXES,
    REGION_MASK_FOLDERS,
    as_region_map,
    find_mask_file,
    load_region_map,
    mask_folder_for,
    paint_by_area,
)

__all__ = [
    "MaskGenerator", "MaskGeneratorCfg", "MASK_GENERATORS", "register_mask_generator", "create_mask_generator",
    "list_mask_generators", "get_mask_generator_cfg", "describe_mask_generators", "AutomaticMasks",
    "as_region_map", "paint_by_area", "load_region_map", "find_mask_file", "mask_folder_for",
    "MASK_FILE_SUFFIXES", "REGION_MASK_FOLDERS",
]
