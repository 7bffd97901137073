"""Feeding tokens on compressed caches: one at a time (:func:`continuation_logits`, greedy decoding) or many rows in
one batched forward pass (:func:`feed_batched`).

Tokens fed after compression get absolute ``position_ids`` (``CompressedPrefill.next_position`` onwards), so kept keys
and new tokens keep their original rotary distances; transformers' causal mask follows the cache length, so the
compressed cache is attended exactly as it stands.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from transformers import DynamicCache

from ..validation import check_ids
from .kv_prefill_compression import CompressedPrefill


@contextmanager
def _rollback(compressed: CompressedPrefill, restore: bool) -> Iterator[None]:
    """Within the block tokens may be appended to the cache; afterwards (with ``restore``) they are cropped off, so
    one compressed prefill can serve several continuations or questions (as kvpress's pipeline does)."""
    length = compressed.cache.get_seq_length()
    try:
        yield
    finally:
        if restore:
            for layer in compressed.cache.layers:
                extra = layer.keys.shape[-2] - length
                if extra > 0:
                    layer.crop(-extra)


@torch.inference_mode()
def continuation_logits(model: nn.Module, compressed: CompressedPrefill, continuation_ids: torch.Tensor, *,
                        restore: bool = True) -> torch.Tensor:
    """Feed ``continuation_ids`` ``(1, n)`` on the compressed cache at their absolute positions; ``(1, n, vocab)``
    float32 logits (row ``i`` predicts the token after ``continuation_ids[i]``).

    Positions start at ``next_position`` plus whatever was already appended since compression, so feeding a text in
    pieces with ``restore=False`` equals feeding it at once. With ``restore`` (default) the cache is cropped back to
    its compressed state afterwards.
    """
    ids = check_ids(continuation_ids, "continuation_ids")
    start = compressed.next_position + compressed.appended()
    positions = torch.arange(start, start + ids.shape[1], device=ids.device)[None]
    with _rollback(compressed, restore):
        logits = model(ids, cache=compressed.cache, position_ids=positions, use_cache=True).logits
    return logits.float()


def _batch_cache(rows: Sequence[CompressedPrefill], config) -> DynamicCache:
    """A new cache holding ``rows`` side by side on the batch axis (copies; the rows' caches stay as they are)."""
    cache = DynamicCache(config=config)
    for i in range(len(rows[0].cache.layers)):
        cache.update(torch.cat([r.cache.layers[i].keys for r in rows]),
                     torch.cat([r.cache.layers[i].values for r in rows]), i)
    return cache


@torch.inference_mode()
def feed_batched(model: nn.Module, items: Sequence[tuple[CompressedPrefill, torch.Tensor]], *,
                 logits_rows: int | None = None, batch_size: int = 32) -> list[torch.Tensor]:
    """Feed each item's ids ``(1, n)`` on its compressed cache, many items per forward pass; the caches are not changed.

    Items whose caches hold the same number of entries, whose next positions agree and whose ids have the same
    length run in one batch (up to ``batch_size`` rows): the batch's cache is the rows' caches stacked, every row's
    length asserted in every layer before and after the pass, so each row attends exactly its own compressed cache.
    Returns, per item in the given order, the ``(logits_rows or n, vocab)`` float32 logits of its last
    ``logits_rows`` fed tokens (row ``i`` predicts the token after the ``i``-th of them). Equals
    :func:`continuation_logits` item by item (within float round-off; tested).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    groups: dict[tuple[int, int, int], list[int]] = defaultdict(list)
    for k, (compressed, ids) in enumerate(items):
        ids = check_ids(ids, "ids")
        if compressed.appended():
            raise ValueError("feed_batched needs caches in their compressed state (nothing appended since)")
        if logits_rows is not None and not 1 <= logits_rows <= ids.shape[1]:
            raise ValueError(f"logits_rows must lie in [1, {ids.shape[1]}] (the tokens fed), got {logits_rows}")
        groups[compressed.compressed_length, compressed.next_position, ids.shape[1]].append(k)
    out: list[torch.Tensor | None] = [None] * len(items)
    config = getattr(model, "config", None)
    for (length, start, n), members in groups.items():
        for first in range(0, len(members), batch_size):
            chunk = members[first : first + batch_size]
            rows = [items[k][0] for k in chunk]
            cache = _batch_cache(rows, config)
            lengths = [int(layer.keys.shape[-2]) for layer in cache.layers]
            if lengths != [length] * len(lengths):
                raise RuntimeError(f"batched cache lengths {lengths}, expected {length} in every layer")
            ids = torch.cat([items[k][1] for k in chunk]).to(rows[0].kept_positions.device)
            positions = torch.arange(start, start + n, device=ids.device).expand(len(chunk), -1)
            logits = model(ids, cache=cache, position_ids=positions, use_cache=True,
                           logits_to_keep=logits_rows or 0).logits.float()
            after = [int(layer.keys.shape[-2]) for layer in cache.layers]
            if after != [length + n] * len(after):
                raise RuntimeError(f"after feeding {n} tokens the batch cache holds {after}, expected {length + n}")
            for row, k in enumerate(chunk):
                out[k] = logits[row]
    return out  # type: ignore[return-value]


def _eos_ids(model: nn.Module, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(tokenizer, "eos_token_id", None),
                   getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if source is None:
            continue
        ids.update(source if isinstance(source, (list, tuple)) else [source])
    return ids


@torch.inference_mode()
def greedy_tokens(model: nn.Module, compressed: CompressedPrefill, prompt_ids: torch.Tensor | None,
                  max_new_tokens: int, eos_ids: Collection[int] = (), *, restore: bool = True) -> list[int]:
    """Greedy decoding on the compressed cache after feeding ``prompt_ids`` (or, when it is None or empty, from the
    prefill's last logits); stops at an id in ``eos_ids`` (not returned) or after ``max_new_tokens``."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    with _rollback(compressed, restore):
        if prompt_ids is not None and prompt_ids.numel() > 0:
            logits = continuation_logits(model, compressed, prompt_ids, restore=False)[:, -1]
        else:
            if compressed.appended():
                raise ValueError("no prompt_ids and tokens were appended since compression: the prefill's last "
                                 "logits no longer predict the next token")
            if compressed.last_logits is None:
                raise ValueError("this compressed cache carries no prefill logits: pass prompt_ids to decode from")
            logits = compressed.last_logits
        generated: list[int] = []
        device = compressed.kept_positions.device
        for step in range(max_new_tokens):
            token = int(logits[0].argmax())
            if token in eos_ids:
                break
            generated.append(token)
            if step + 1 < max_new_tokens:
                logits = continuation_logits(model, compressed, torch.tensor([[token]], device=device),
                                             restore=False)[:, -1]
    return generated


def greedy_answer(model: nn.Module, compressed: CompressedPrefill, prompt_ids: torch.Tensor | None,
                  max_new_tokens: int, tokenizer, *, restore: bool = True) -> str:
    """:func:`greedy_tokens` decoded with ``tokenizer`` (special tokens skipped); stops at the tokenizer's or the
    model's end-of-sequence token."""
    tokens = greedy_tokens(model, compressed, prompt_ids, max_new_tokens, _eos_ids(model, tokenizer),
                           restore=restore)
    return tokenizer.decode(tokens, skip_special_tokens=True)
