"""Extraction: images -> frozen LPM (timm) -> important-token K/V -> fpt.store.

Public API: ``extract(cfg)``, ``FrozenLPM``, ``create_backbone``, ``select_important_tokens``,
``token_importance``, the sources ``ImageFolderSource`` / ``SyntheticTextureSource``.
"""
from fpt.extract.backbone import BackboneInfo, FrozenLPM, create_backbone
from fpt.extract.datasets import ImageFolderSource, SampleRef, SyntheticTextureSource, open_source, prepare_image
from fpt.extract.run import ExtractResult, default_layers, extract
from fpt.extract.selection import num_selected, select_important_tokens, token_importance

__all__ = ["BackboneInfo", "FrozenLPM", "create_backbone", "ImageFolderSource", "SampleRef",
           "SyntheticTextureSource", "open_source", "prepare_image", "ExtractResult", "default_layers", "extract",
           "num_selected", "select_important_tokens", "token_importance"]
