"""Backbones (one ViT for DINOv2 and DINOv3), the DINO/iBOT head, presets and weight loading."""

from dinoscale.models.attention import attention, resolve_backend
from dinoscale.models.describe import describe_presets, format_presets_table
from dinoscale.models.head import DINOHead, build_head
from dinoscale.models.loading import detect_spec, load_backbone, save_backbone
from dinoscale.models.presets import PRESETS, PUBLISHED, SIZES, build_backbone, preset_spec, resolve_spec
from dinoscale.models.spec import BackboneSpec
from dinoscale.models.vit import VisionTransformer

__all__ = [
    "BackboneSpec", "DINOHead", "PRESETS", "PUBLISHED", "SIZES", "VisionTransformer", "attention", "build_backbone",
    "build_head", "describe_presets", "detect_spec", "format_presets_table", "load_backbone", "preset_spec",
    "resolve_backend", "resolve_spec", "save_backbone",
]
