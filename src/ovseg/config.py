"""Shared constants: normalisation statistics used by the reference pipelines
(docs/methods.md, "Input and resize", "VFM input")."""
from __future__ import annotations

# OpenAI CLIP normalisation (exact values, as used to un-normalise a crop for a VFM).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The references' SegDataPreProcessor constants: CLIP's x255, rounded to 3 decimals.
CLIP_PIXEL_MEAN = (122.771, 116.746, 104.094)
CLIP_PIXEL_STD = (68.501, 66.632, 70.323)

# ImageNet statistics: the input normalisation of every VFM in ProxyCLIP.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PRECISIONS = ("fp32", "fp16", "bf16")
