"""How much of a speech-to-text model's input relevance its cross-attention shows ("Cross-Attention is Half
Explanation" [@cross_attention_half]).

For each token Whisper [@whisper] generates (greedy, from the full 30 s window), two maps over the encoder frames
that hold speech:

* **cross-attention** (:func:`cross_attention_maps`): the decoder's cross-attention row that predicts the token, per
  layer and head, from one teacher-forced pass over the generated tokens;
* **saliency** (:func:`saliency_maps`): gradient × input [@gradient_x_input] of the token's log-probability with
  respect to the log-mel input, its magnitude summed over the 80 mel bins and over the two mel frames each encoder
  frame covers (the encoder's stride-2 convolution).

:func:`map_correlations` compares them per token with Pearson's r (the paper's measure) for every aggregation: each
head, each layer's mean over heads, the mean over every layer and head, a monotonic-alignment prior that knows only
the token's position in the transcript (:func:`alignment_prior`), and seeded noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers.modeling_outputs import BaseModelOutput

from .harness.whisper_pruning import PROMPT

#: log-mel frames per encoder frame (Whisper's second convolution has stride 2)
MEL_PER_FRAME = 2


@dataclass(frozen=True)
class TokenMaps:
    """One utterance's maps over its ``F`` speech frames, one row per generated token ``(n, ...)``.

    ``attention (layers, heads, n, F)``: cross-attention rows predicting each token (renormalised over the speech
    frames is not done: Pearson's r does not see the scale); ``saliency (n, F)``: gradient × input magnitude."""

    tokens: list[int]
    attention: np.ndarray
    saliency: np.ndarray

    @property
    def frames(self) -> int:
        return int(self.saliency.shape[1])


def decoder_ids(tokens: list[int]) -> torch.Tensor:
    """``(1, 2 + n)`` the English-only prompt followed by the generated tokens (row ``1 + j`` predicts token ``j``)."""
    if not tokens:
        raise ValueError("no generated tokens: there is nothing to explain (the model emitted only end-of-text)")
    return torch.tensor([list(PROMPT) + list(tokens)])


def predicting_rows(n: int) -> torch.Tensor:
    """Decoder rows that predict the ``n`` generated tokens: ``len(PROMPT) − 1 + j``."""
    return torch.arange(n) + len(PROMPT) - 1


@torch.no_grad()
def cross_attention_maps(model, features: torch.Tensor, tokens: list[int], speech_frames: int,
                         encoder_hidden: torch.Tensor | None = None) -> np.ndarray:
    """``(layers, heads, n, F)`` float64: the cross-attention of the rows predicting each generated token over the
    first ``F = speech_frames`` encoder frames, from one teacher-forced pass (eager attention). ``encoder_hidden``:
    the encoder's output for ``features`` when the caller has it (the encoder, Whisper's costly half, then does not
    run again)."""
    ids = decoder_ids(tokens).to(features.device)
    if encoder_hidden is None:
        out = model(input_features=features, decoder_input_ids=ids, output_attentions=True)
    else:
        out = model(encoder_outputs=BaseModelOutput(last_hidden_state=encoder_hidden), decoder_input_ids=ids,
                    output_attentions=True)
    rows = predicting_rows(len(tokens)).to(features.device)
    maps = torch.stack([a[0][:, rows, :speech_frames] for a in out.cross_attentions])  # (L, H, n, F)
    return maps.double().cpu().numpy()


def saliency_maps(model, features: torch.Tensor, tokens: list[int], speech_frames: int, chunk: int = 8
                  ) -> np.ndarray:
    """``(n, F)`` float64: per generated token, ``Σ_mel |x · ∂ log p(token) / ∂x|`` over the log-mel input ``x``
    ``(1, 80, 3000)``, summed over the two mel frames of each of the first ``F`` encoder frames.

    Gradient × input (captum's ``InputXGradient`` computes the same) with the encoder's forward pass shared: the
    encoder runs once, every token's gradient with respect to its output comes from one batched decoder pass, and
    each is pulled back through the encoder by a vector-Jacobian product, ``chunk`` tokens at a time
    (``is_grads_batched``). captum's ``InputXGradient`` gives the same numbers with a forward and backward pass of
    the whole model per token: 94 s against 51 s here for 3 utterances (56 tokens) of Whisper tiny.en on 2 cores,
    whose 30 s encoder dominates (tests check the result against per-token autograd)."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    device = features.device
    ids, n = decoder_ids(tokens).to(device), len(tokens)
    rows, targets = predicting_rows(n).to(device), torch.tensor(tokens, device=device)
    x = features.detach().clone().requires_grad_(True)
    per_mel = []
    with torch.enable_grad():
        hidden = model.model.encoder(x).last_hidden_state  # (1, 1500, d)
        copies = hidden.detach().expand(n, -1, -1).clone().requires_grad_(True)  # copy j explains token j
        logits = model(encoder_outputs=BaseModelOutput(last_hidden_state=copies),
                       decoder_input_ids=ids.expand(n, -1)).logits
        every = torch.arange(n, device=device)
        log_probs = logits[every, rows].float().log_softmax(-1)[every, targets]
        (to_hidden,) = torch.autograd.grad(log_probs.sum(), copies)  # (n, 1500, d): the copies do not interact
        for start in range(0, n, chunk):
            cotangents = to_hidden[start:start + chunk].unsqueeze(1)  # (c, 1, 1500, d)
            (to_input,) = torch.autograd.grad(hidden, x, grad_outputs=cotangents, retain_graph=True,
                                              is_grads_batched=True)  # (c, 1, 80, 3000)
            per_mel.append((to_input[:, 0] * features.detach()).abs().sum(1).double().cpu().numpy())
    per_mel = np.concatenate(per_mel)  # (n, 3000)
    usable = speech_frames * MEL_PER_FRAME
    return per_mel[:, :usable].reshape(n, speech_frames, MEL_PER_FRAME).sum(-1)


def alignment_prior(n: int, frames: int) -> np.ndarray:
    """``(n, F)``: a monotonic-alignment map that knows only each token's place in the transcript: a Gaussian over
    the frames centred at ``(j + 0.5) / n`` of the speech, with a standard deviation of one token's share."""
    if n < 1 or frames < 1:
        raise ValueError(f"need n >= 1 tokens and frames >= 1, got {n}, {frames}")
    centres = (np.arange(n) + 0.5) / n * frames
    width = max(frames / n, 1.0)
    grid = np.arange(frames) + 0.5
    return np.exp(-0.5 * ((grid[None, :] - centres[:, None]) / width) ** 2)


def pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson's r of each row of ``a`` with the same row of ``b`` (``(..., n, F)`` against ``(n, F)``); NaN where
    a row is constant."""
    a = np.asarray(a, dtype=np.float64)
    b = np.broadcast_to(np.asarray(b, dtype=np.float64), a.shape)
    a0, b0 = a - a.mean(-1, keepdims=True), b - b.mean(-1, keepdims=True)
    denom = np.sqrt((a0 ** 2).sum(-1) * (b0 ** 2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (a0 * b0).sum(-1) / denom, np.nan)


def map_correlations(maps: TokenMaps, seed: int) -> dict[str, np.ndarray]:
    """Per token ``(n,)`` Pearson's r with the saliency map, for each aggregation of the cross-attention:
    ``head_mean`` (r of every head, averaged), ``layer_<l>`` (layer ``l``'s mean over heads), ``all_layers_heads``
    (the mean over every layer and head), ``alignment_prior`` and ``noise`` (seeded uniform maps)."""
    att, sal = maps.attention, maps.saliency
    n, frames = sal.shape
    out = {"head_mean": np.nanmean(pearson_rows(att, sal), axis=(0, 1))}
    for layer in range(att.shape[0]):
        out[f"layer_{layer}"] = pearson_rows(att[layer].mean(0), sal)
    out["all_layers_heads"] = pearson_rows(att.mean((0, 1)), sal)
    out["alignment_prior"] = pearson_rows(alignment_prior(n, frames), sal)
    out["noise"] = pearson_rows(np.random.default_rng(seed).random((n, frames)), sal)
    return out


__all__ = ["MEL_PER_FRAME", "TokenMaps", "alignment_prior", "cross_attention_maps", "decoder_ids",
           "map_correlations", "pearson_rows", "predicting_rows", "saliency_maps"]
