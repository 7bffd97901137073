"""GlobEnc [@globenc]: norm-based token attribution of whole encoder blocks, rolled out over layers.

Variant implemented (what the workbook calls GlobEnc): Kobayashi et al.'s norm of each token's transformed value
vector with the first residual and first layer norm included [@norm_attribution] (their "N_ResLN"), aggregated
over layers by rollout as GlobEnc does. The second half of the block (feed-forward, second residual, second layer
norm) is left out; GlobEnc's full variant also folds in the second residual and layer norm (not the feed-forward).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..validation import check_choice
from .attribution_target import AttributionTarget, require_attention_weights
from .base import AttentionView, Scorer, register
from .explanation_common import QUERIES, explained_index, require_target

#: block layouts the decomposition knows: BERT / all-MiniLM (attention → +x → LayerNorm) and Llama / SmolLM2
#: (RMSNorm → attention → +x)
BLOCKS = ("post_ln", "pre_ln")


def block_layout(model: nn.Module) -> tuple[str, list[nn.Module]]:
    """``(layout, blocks)`` of a BERT-style post-LN encoder or a Llama-style pre-RMSNorm decoder; raises otherwise."""
    base = getattr(model, "base_model", model)
    encoder = getattr(base, "encoder", None)
    blocks = list(getattr(encoder, "layer", None) or getattr(base, "layers", None) or [])
    if blocks and hasattr(blocks[0], "attention") and hasattr(blocks[0].attention, "output") \
            and hasattr(blocks[0].attention.output, "LayerNorm"):
        return "post_ln", blocks
    if blocks and hasattr(blocks[0], "input_layernorm") and hasattr(getattr(blocks[0], "self_attn", None), "o_proj"):
        return "pre_ln", blocks
    raise ValueError(f"globenc decomposes BERT-style post-LayerNorm encoders (BertModel, all-MiniLM) and Llama-style "
                     f"pre-RMSNorm decoders (SmolLM2); {type(model).__name__} is neither: use attention_rollout or a "
                     "gradient scorer")


def _head_outputs(values: torch.Tensor, out_weight: torch.Tensor, heads: int) -> torch.Tensor:
    """``f_h(x_j)``: ``(B, H, K, d)`` each head's value vector ``(B, K, H·D)`` through its slice of the output
    projection (``out_weight`` ``(d, H·D)``, an ``nn.Linear`` weight), biases left out."""
    b, k, hd = values.shape
    per_head = values.view(b, k, heads, hd // heads)
    projection = out_weight.t().reshape(heads, hd // heads, out_weight.shape[0])
    return torch.einsum("bkhe,hed->bhkd", per_head, projection)


def token_contributions(layout: str, block: nn.Module, x: torch.Tensor, attention: torch.Tensor,
                        ln_input: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, K, K, d)``: the part of token ``i``'s block output that comes from input token ``j`` (``[:, i, j]``).

    ``post_ln`` (BERT): ``g_i(Σ_h α^h_ij f_h(x_j) + δ_ij x_j)`` with ``g_i(y) = γ ⊙ (y − mean y) / s_i`` the first
    layer norm made linear by its input's standard deviation ``s_i`` (from ``ln_input`` ``(B, K, d)``, the actual
    LayerNorm input). Summed over ``j`` plus the biases' share and β it gives the LayerNorm output exactly.
    ``pre_ln`` (Llama): ``Σ_h α^h_ij f_h(RMSNorm(x_j)) + δ_ij x_j``; summed over ``j`` it gives ``x_i + attn_i``.
    ``x``: the block input ``(B, K, d)``; ``attention``: its probabilities ``(B, H, K, K)``.
    """
    x, attention = x.float(), attention.float()
    if layout == "post_ln":
        self_attention, output = block.attention.self, block.attention.output
        values = F.linear(x, self_attention.value.weight.float())
        f = _head_outputs(values, output.dense.weight.float(), attention.shape[1])
    else:
        attn = block.self_attn
        values = F.linear(block.input_layernorm(x).float(), attn.v_proj.weight.float())
        heads, kv_heads = attention.shape[1], attn.v_proj.weight.shape[0] // attn.head_dim
        b, k, _ = values.shape
        values = values.view(b, k, kv_heads, attn.head_dim).repeat_interleave(heads // kv_heads, dim=2)
        f = _head_outputs(values.reshape(b, k, -1), attn.o_proj.weight.float(), heads)
    z = torch.einsum("bhij,bhjd->bijd", attention, f)
    diagonal = torch.arange(x.shape[1], device=x.device)
    z[:, diagonal, diagonal] += x
    if layout == "pre_ln":
        return z
    norm = block.attention.output.LayerNorm
    scale = (ln_input.float().var(dim=-1, unbiased=False) + norm.eps).sqrt()
    return norm.weight.float() * (z - z.mean(dim=-1, keepdim=True)) / scale[:, :, None, None]


def layer_attributions(target: AttributionTarget, who: str = "globenc") -> list[torch.Tensor]:
    """``(B, K, K)`` per block, oldest first: ``‖contribution of j to i‖``, rows normalised to sum to 1."""
    model = target.model
    layout, blocks = block_layout(model)
    require_attention_weights(model, who)
    inputs: dict[int, torch.Tensor] = {}
    ln_inputs: dict[int, torch.Tensor] = {}
    handles = []
    for index, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(
            lambda _m, args, kwargs, i=index: inputs.__setitem__(i, args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True))
        if layout == "post_ln":
            handles.append(block.attention.output.LayerNorm.register_forward_pre_hook(
                lambda _m, args, i=index: ln_inputs.__setitem__(i, args[0])))
    try:
        with torch.no_grad():
            outputs = model(inputs_embeds=target.embeddings, attention_mask=target.attention_mask,
                            output_attentions=True)
            norms = []
            for index, block in enumerate(blocks):
                z = token_contributions(layout, block, inputs[index], outputs.attentions[index], ln_inputs.get(index))
                n = z.norm(dim=-1)
                norms.append(n / n.sum(dim=-1, keepdim=True).clamp_min(1e-12))
    finally:
        for handle in handles:
            handle.remove()
    return norms


@register
@dataclass
class GlobEnc(Scorer):
    """GlobEnc (N_ResLN variant, see the module docstring): ``N^l_ij = ‖LN1-share of (Σ_h α^{l,h}_ij f_h(x_j) +
    δ_ij x_j)‖``, rows normalised; ``R = N^L ⋯ N^1``; ``s_j = R_{q,j}`` for the explained token ``q``.

    BERT / all-MiniLM blocks (post-LN) include the first layer norm as GlobEnc does; Llama / SmolLM2 blocks (pre-LN)
    have their RMSNorm inside ``f`` and no norm after the residual, so there the contribution is the norm of the
    residual stream's share. Other block layouts raise. Biases are constant over tokens and left out.

    Parameters:
        query: ``auto`` ([CLS] where the view has that role, else the last token), ``cls`` or ``last``.

    Reads the attribution target (the model is run once more with hooks on every block; it needs eager attention);
    returns ``(B, 1, K)``, a distribution over the input tokens.
    """

    name = "globenc"
    head_layout = "shared"
    #: runs the model itself; ``attention_layers`` marks it attention-based (it reads every layer's eager attention)
    needs = frozenset({"model", "attention_layers"})
    query: str = "auto"

    def __post_init__(self) -> None:
        check_choice(self.query, QUERIES, "query")

    def score(self, view: AttentionView) -> torch.Tensor:
        target = require_target(view, self.name)
        rollout = None
        for n in layer_attributions(target, self.name):
            rollout = n if rollout is None else n @ rollout
        row = explained_index(view, self.query, self.name)
        return rollout[:, row, :].unsqueeze(1)
