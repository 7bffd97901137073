"""Pure token-reduction functions: the core of every vision reduction (drop, ToMe, VisionZip), with no model code.

:func:`reduction_map` is the one entry point: scores, a similarity metric and a budget in, a destination map out.
The in-encoder harness (:mod:`salience.harness.vit_pruning`) applies it between blocks; the after-encoder setting
(:mod:`salience.vision_eval`) applies it to an encoder's cached output tokens, without running the model again.

Every reduction is written as a destination map ``dest (B, K)`` (int64): token ``k`` of row ``b`` ends in output token
``dest[b, k]`` of that row, or is dropped when ``dest[b, k] == -1``. Output tokens keep the original order of the
tokens that survive as themselves (so [CLS] stays first). :func:`merge_by_destination` turns a map into merged
hidden states and sizes; a token's size is how many original patches it stands for (ToMe, Bolya et al. 2023).

Shapes: B batch, K current tokens, C metric channels (ToMe's metric is the layer's keys averaged over heads).
"""

from __future__ import annotations

import torch

from ..selection import select_topk
from ..validation import check_choice

#: the reductions :func:`reduction_map` knows: drop by score, ToMe bipartite merging, VisionZip dominant + contextual
METHODS = ("drop", "tome", "visionzip")
#: VisionZip's default share of the budget given to contextual (merged) tokens: every default in the package reads it
CONTEXTUAL = 0.15


def merge_by_destination(x: torch.Tensor, sizes: torch.Tensor, dest: torch.Tensor, n_out: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average of every group of tokens that share a destination.

    Args:
        x: ``(B, K, d)`` token states; sizes: ``(B, K)`` positive sizes; dest: ``(B, K)`` output index or -1 (dropped).
        n_out: number of output tokens per row (every index in ``[0, n_out)`` must be hit at least once).

    Returns:
        ``(B, n_out, d)`` merged states ``Σ s_k x_k / Σ s_k`` and ``(B, n_out)`` summed sizes.
    """
    if x.shape[:2] != sizes.shape or sizes.shape != dest.shape:
        raise ValueError(f"x {tuple(x.shape)}, sizes {tuple(sizes.shape)} and dest {tuple(dest.shape)} disagree")
    b, _, d = x.shape
    live = dest >= 0
    # dropped tokens go to a spare slot n_out that is cut off afterwards
    target = torch.where(live, dest, torch.full_like(dest, n_out))
    w = sizes.to(x.dtype) * live.to(x.dtype)
    summed = x.new_zeros(b, n_out + 1, d).scatter_add_(1, target[..., None].expand(-1, -1, d), x * w[..., None])
    new_sizes = sizes.new_zeros(b, n_out + 1).scatter_add_(1, target, sizes * live.to(sizes.dtype))
    new_sizes = new_sizes[:, :n_out]
    if bool((new_sizes <= 0).any()):
        raise ValueError("some output token received no input token: dest must hit every index in [0, n_out)")
    return summed[:, :n_out] / new_sizes[..., None].to(x.dtype), new_sizes


def _survivor_dest(survives: torch.Tensor) -> torch.Tensor:
    """``(B, K)`` bool survivors → their output index in original order (-1 for the others)."""
    index = survives.long().cumsum(dim=1) - 1
    return torch.where(survives, index, torch.full_like(index, -1))


def bipartite_destination(metric: torch.Tensor, r: int, protected: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe's bipartite soft matching: merge ``r`` tokens of each row into their most similar partners.

    Tokens alternate into set A (even index) and set B (odd index); each A token proposes its most cosine-similar
    B token; the ``r`` A tokens with the most similar proposals merge into them; everything else survives.
    Protected tokens ([CLS], registers) neither merge away nor absorb others.

    Args:
        metric: ``(B, K, C)`` similarity features; r: tokens to remove per row, ``0 ≤ r ≤`` unprotected A tokens.
        protected: ``(K,)`` or ``(B, K)`` bool.

    Returns:
        ``dest (B, K)`` for :func:`merge_by_destination` with ``n_out = K - r``, and ``survives (B, K)`` bool (the
        tokens that stay as their group's representative, in original order).
    """
    b, k, _ = metric.shape
    protected = torch.zeros(k, dtype=torch.bool, device=metric.device) if protected is None else protected
    protected = protected.to(torch.bool).expand(b, k)
    a_idx = torch.arange(0, k, 2, device=metric.device)
    b_idx = torch.arange(1, k, 2, device=metric.device)
    mergeable = int((~protected[:, a_idx]).sum(dim=1).min()) if len(b_idx) and bool((~protected[:, b_idx]).any()) else 0
    if not 0 <= r <= mergeable:
        raise ValueError(f"ToMe can merge r in [0, {mergeable}] tokens here ({k} tokens, protected ones excluded), "
                         f"got {r}")
    survives = torch.ones(b, k, dtype=torch.bool, device=metric.device)
    if r == 0:
        return _survivor_dest(survives), survives
    m = torch.nn.functional.normalize(metric.float(), dim=-1)
    scores = m[:, a_idx] @ m[:, b_idx].transpose(1, 2)  # (B, Ka, Kb)
    scores = scores.masked_fill(protected[:, a_idx, None], -torch.inf)
    scores = scores.masked_fill(protected[:, None, b_idx], -torch.inf)
    best, partner = scores.max(dim=-1)  # (B, Ka)
    src = best.argsort(dim=-1, descending=True, stable=True)[:, :r]  # A positions that merge away
    rows = torch.arange(b, device=metric.device)[:, None]
    survives[rows, a_idx[src]] = False
    dest = _survivor_dest(survives)
    dest[rows, a_idx[src]] = dest[rows, b_idx[partner.gather(1, src)]]
    return dest, survives


def tome_destination(metric: torch.Tensor, sizes: torch.Tensor, r: int, protected: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove ``r`` tokens by repeated bipartite matching (one round removes at most half of the tokens).

    Between rounds the metric is merged by size-weighted averages, as ToMe does from one layer to the next.
    Returns the composed ``(dest, survives)`` over the original ``K`` tokens.
    """
    b, k, _ = metric.shape
    protected = torch.zeros(k, dtype=torch.bool, device=metric.device) if protected is None else protected
    protected = protected.to(torch.bool).expand(b, k).clone()
    dest = torch.arange(k, device=metric.device).expand(b, k).clone()
    survives = torch.ones(b, k, dtype=torch.bool, device=metric.device)
    remaining = r
    while True:
        cur = metric.shape[1]
        a_free = int((~protected[:, 0::2]).sum(dim=1).min())
        b_free = int((~protected[:, 1::2]).sum(dim=1).min())
        step = min(remaining, a_free if b_free else 0)
        if step == 0 and remaining > 0:
            raise ValueError(f"ToMe cannot remove {r} of {k} tokens (protected tokens excluded); "
                             f"at most {r - remaining} could be merged")
        d, keep = bipartite_destination(metric, step, protected)
        n_out = cur - step
        metric, sizes = merge_by_destination(metric, sizes, d, n_out)
        protected = protected[keep].view(b, n_out)
        survives[survives.clone()] = keep.reshape(-1)
        dest = d.gather(1, dest)
        remaining -= step
        if remaining == 0:
            return dest, survives


def contextual_destination(metric: torch.Tensor, keep: torch.Tensor, n_contextual: int
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip's contextual tokens: the tokens not kept are merged into ``n_contextual`` centres.

    The centres are spread evenly over the remaining tokens (in their current order); every other remaining token
    joins the centre whose metric is most similar (dot product of normalised vectors), as VisionZip does with keys.

    Args:
        metric: ``(B, K, C)``; keep: ``(B, K)`` bool, tokens kept as themselves ([CLS] and dominant tokens);
        n_contextual: centres per row, ``0 ≤ n_contextual ≤`` remaining tokens (0 drops the rest).

    Returns:
        ``dest (B, K)`` for :func:`merge_by_destination` (``n_out`` = kept + n_contextual) and ``survives (B, K)``.
    """
    b, k, _ = metric.shape
    remaining = ~keep
    n_rest = remaining.sum(dim=1)
    if not bool((n_rest == n_rest[0]).all()):
        raise ValueError("every row must keep the same number of tokens")
    n_rest = int(n_rest[0])
    if not 0 <= n_contextual <= n_rest:
        raise ValueError(f"n_contextual must lie in [0, {n_rest}] (tokens left after the kept ones), "
                         f"got {n_contextual}")
    rest_idx = torch.nonzero(remaining)[:, 1].view(b, n_rest)  # ascending per row
    centre = keep.clone()
    if n_contextual == 0:
        return _survivor_dest(keep), keep.clone()
    step = n_rest / n_contextual
    picks = (torch.arange(n_contextual, device=metric.device) * step).long()
    rows = torch.arange(b, device=metric.device)[:, None]
    centre_idx = rest_idx[:, picks]  # (B, n_ctx)
    centre[rows, centre_idx] = True
    dest = _survivor_dest(centre)
    m = torch.nn.functional.normalize(metric.float(), dim=-1)
    sim = m[rows, rest_idx] @ m[rows, centre_idx].transpose(1, 2)  # (B, n_rest, n_ctx)
    nearest = centre_idx.gather(1, sim.argmax(dim=-1))  # (B, n_rest) token index of each one's centre
    own = dest.clone()
    dest[rows, rest_idx] = own.gather(1, nearest)
    dest[rows, centre_idx] = own[rows, centre_idx]  # a centre stays its own group even if it ties with another
    return dest, centre


def contextual_count(budget: int, contextual: float) -> int:
    """VisionZip's contextual tokens out of ``budget`` output patch tokens: ``round(contextual · budget)``, at least
    one and at most ``budget - 1`` (0 when ``contextual`` is 0 or the budget is a single token)."""
    if budget <= 1 or contextual <= 0:
        return 0
    return min(budget - 1, max(1, round(contextual * budget)))


def reduction_map(method: str, budget: int, protected: torch.Tensor, *, scores: torch.Tensor | None = None,
                  metric: torch.Tensor | None = None, sizes: torch.Tensor | None = None, contextual: float = CONTEXTUAL
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The pure core of every reduction: where each of ``K`` tokens goes when ``budget`` patch tokens remain.

    Args:
        method: ``"drop"`` (keep the ``budget`` highest ``scores``), ``"tome"`` (bipartite merging on ``metric``
            down to ``budget``) or ``"visionzip"`` (dominant tokens by ``scores``, the rest merged by ``metric``
            into :func:`contextual_count` contextual tokens; dominant + contextual = ``budget``).
        budget: output tokens besides the protected ones, ``1 ≤ budget ≤`` unprotected tokens.
        protected: ``(B, K)`` bool, the same count in every row ([CLS], registers): kept as themselves, never merged.
        scores: ``(B, K)`` higher keeps (drop, visionzip); metric: ``(B, K, C)`` similarity features (tome,
            visionzip); sizes: ``(B, K)`` patches per token (tome weighs the metric by them between rounds).

    Returns:
        ``dest (B, K)`` (output index, -1 dropped) and ``survives (B, K)`` bool, for :func:`merge_by_destination`
        with ``n_out = protected + budget``.
    """
    check_choice(method, METHODS, "method")
    b, k = protected.shape
    n_protected = int(protected[0].sum())
    if not bool((protected.sum(dim=1) == n_protected).all()):
        raise ValueError("every row must protect the same number of tokens")
    if not 1 <= budget <= k - n_protected:
        raise ValueError(f"budget must lie in [1, {k - n_protected}] (unprotected tokens), got {budget}")
    if method != "tome" and (scores is None or scores.shape != (b, k)):
        raise ValueError(f"method {method!r} needs scores of shape {(b, k)}")
    if method != "drop" and (metric is None or metric.shape[:2] != (b, k)):
        raise ValueError(f"method {method!r} needs a similarity metric of shape ({b}, {k}, C)")
    if method == "tome":
        sizes = torch.ones(b, k, device=metric.device) if sizes is None else sizes
        return tome_destination(metric, sizes, k - n_protected - budget, protected)
    n_ctx = contextual_count(budget, contextual) if method == "visionzip" else 0
    kept = select_topk(scores, n_protected + budget - n_ctx, protected)
    chosen = torch.zeros(b, k, dtype=torch.bool, device=scores.device).scatter_(1, kept, True)
    if method == "drop":
        return _survivor_dest(chosen), chosen
    return contextual_destination(metric, chosen, n_ctx)
