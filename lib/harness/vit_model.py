"""The parts of a Hugging Face ViT-like encoder the vision harness drives, and a FLOPs estimate (the argument checks
live in :mod:`salience.validation`).

Works on any encoder whose blocks can be called as ``block(hidden, None)``: ``Dinov2Model`` (the embedded
``dinov2-s``), ``ViTModel``, ``CLIPVisionModel``, ``SiglipVisionModel`` (no [CLS]). The parts (embeddings, blocks,
final norm) are found by attribute name (:func:`vit_parts`), never by copying model code.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class VitParts:
    """The pieces of a ViT-like encoder the harness drives.

    Attributes:
        embeddings: pixel values → ``(B, n_prefix + N, d)`` tokens; pre_norm: applied after it (CLIP) or None.
        blocks: the transformer blocks in order; final_norm: the norm applied to every output token.
        config: the vision config (hidden size, heads, MLP size, patch size).
    """

    embeddings: nn.Module
    blocks: Sequence[nn.Module]
    final_norm: nn.Module | None
    pre_norm: nn.Module | None
    config: object

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def patch_size(self) -> int:
        p = self.config.patch_size
        return int(p[0] if isinstance(p, (tuple, list)) else p)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        kwargs = {}
        if "interpolate_pos_encoding" in inspect.signature(self.embeddings.forward).parameters:
            kwargs["interpolate_pos_encoding"] = True
        hidden = self.embeddings(pixel_values, **kwargs)
        return self.pre_norm(hidden) if self.pre_norm is not None else hidden

    def normed(self, hidden: torch.Tensor) -> torch.Tensor:
        """The encoder's output tokens: ``final_norm(hidden)`` (identity when the model has no final norm)."""
        return self.final_norm(hidden) if self.final_norm is not None else hidden


def _first_attr(obj, names):
    for name in names:
        value = getattr(obj, name, None)
        if value is not None:
            return value
    return None


def vit_parts(model: nn.Module) -> VitParts:
    """Find embeddings, blocks and final norm of a Hugging Face ViT-like encoder (ViT, DINOv2, CLIP/SigLIP vision)."""
    root = _first_attr(model, ("vision_model", "vit", "dinov2")) or model
    embeddings = getattr(root, "embeddings", None)
    encoder = getattr(root, "encoder", None)
    blocks = _first_attr(encoder, ("layer", "layers")) if encoder is not None else None
    if embeddings is None or blocks is None:
        raise ValueError(f"{type(model).__name__} does not look like a ViT encoder: expected .embeddings and "
                         ".encoder.layer(s) (ViTModel, Dinov2Model, CLIPVisionModel, SiglipVisionModel)")
    final_norm = _first_attr(root, ("layernorm", "post_layernorm", "norm", "final_layernorm"))
    pre_norm = _first_attr(root, ("pre_layrnorm", "pre_layernorm"))
    config = getattr(model.config, "vision_config", None) or model.config
    return VitParts(embeddings, list(blocks), final_norm, pre_norm, config)


# ------------------------------------------------------------------------------------------------------- FLOPs
def mlp_macs_per_token(config) -> int:
    """Multiply-accumulates of one token through one block's MLP, from the config (SwiGLU for DINOv2-g style)."""
    d = config.hidden_size
    if getattr(config, "use_swiglu_ffn", False):
        hidden = int(d * config.mlp_ratio)
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        return 3 * d * hidden
    inner = getattr(config, "intermediate_size", None) or int(d * getattr(config, "mlp_ratio", 4))
    return 2 * d * inner


def block_flops(config, n: int) -> float:
    """FLOPs (2 x MACs) of one block on ``n`` tokens: Q, K, V, O projections ``4 n d²``, scores and weighted sum
    ``2 n² d``, MLP; norms, softmax and biases are left out (a few percent)."""
    d = config.hidden_size
    return 2.0 * (4 * n * d * d + 2 * n * n * d + n * mlp_macs_per_token(config))


def estimate_flops(config, tokens_per_layer: Sequence[int], n_patches: int) -> float:
    """Estimated FLOPs per image: patch embedding (``2 N 3 p² d``) plus every block at its recorded length."""
    p = config.patch_size[0] if isinstance(config.patch_size, (tuple, list)) else config.patch_size
    channels = getattr(config, "num_channels", 3)
    embed = 2.0 * n_patches * channels * p * p * config.hidden_size
    return embed + sum(block_flops(config, n) for n in tokens_per_layer)


__all__ = ["VitParts", "block_flops", "estimate_flops", "mlp_macs_per_token", "vit_parts"]
