"""Extraction: images -> frozen LPM (timm) -> important-token K/V -> fpt.store.

Public API: ``extract(cfg)``, ``FrozenLPM``, ``create_backbone``, ``select_important_tokens``,
``token_importance``, the sources ``ImageFolderSource`` / ``SyntheticTextureSource``; for ``fpt.predict``, which
runs the LPM as extraction does: ``encode_batch``, ``stack_pixels``, ``lpm_input``, ``low_res_copy``,
``FileDecoding``, ``IMAGE_EXTENSIONS``.
"""
from fpt.extract.backbone import BackboneInfo, FrozenLPM, create_backbone
from fpt.extract.datasets import ImageFolderSource, SyntheticTextureSource, open_source
from fpt.extract.encode import encode_batch, stack_pixels
from fpt.extract.images import IMAGE_EXTENSIONS, FileDecoding, load_image_file, low_res_copy, lpm_input, prepare_image
from fpt.extract.run import ExtractResult, default_layers, extract
from fpt.extract.samples import SampleRef
from fpt.extract.selection import (
           num_selected,
           select_important_tokens,
           token_importance,
)

__all__ = ["BackboneInfo", "FrozenLPM", "create_backbone", "ImageFolderSource", "SampleRef",
           "SyntheticTextureSource", "open_source", "encode_batch", "stack_pixels", "IMAGE_EXTENSIONS", "FileDecoding",
           "load_image_file", "low_res_copy", "lpm_input", "prepare_image",
           "ExtractResult", "default_layers", "extract",
           "num_selected", "select_important_tokens", "token_importance"]
