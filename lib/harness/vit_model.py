"""The parts of a Hugging Face ViT-like encoder the vision harness drives, argument checks, and a FLOPs estimate.

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

from .token_merging import METHODS


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


# ---------------------------------------------------------------------------------------------------- validation
def check_keep(keep: float | int, n_patches: int | None = None) -> None:
    """A kept share must be a ratio in (0, 1] (or, with ``n_patches``, a patch count in [1, n_patches])."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise ValueError(f"keep must be a ratio in (0, 1] or a patch count, got {keep!r}")
    if isinstance(keep, float):
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"keep ratio must lie in (0, 1], got {keep}")
    elif keep < 1 or (n_patches is not None and keep > n_patches):
        raise ValueError(f"keep as a patch count must lie in [1, {n_patches or 'number of patches'}] (a ratio in "
                         f"(0, 1] otherwise), got {keep}")


def check_layer(layer: int, depth: int) -> None:
    """Reduction happens after block ``layer``; at least one block must run on the reduced tokens."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= depth - 1:
        raise ValueError(f"pruning layer must be an integer in [1, {depth - 1}] for this {depth}-layer model "
                         f"(reduce after block l, blocks l+1..{depth} run on the kept tokens), got {layer!r}")


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def check_pixels(pixel_values, patch: int) -> None:
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
        got = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
        raise ValueError(f"pixel_values must be a (B, C, H, W) tensor, got {got}")
    h, w = pixel_values.shape[-2:]
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} must be a multiple of the patch size {patch}")


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


__all__ = ["VitParts", "block_flops", "check_keep", "check_layer", "check_method", "check_pixels", "estimate_flops",
           "mlp_macs_per_token", "vit_parts"]
