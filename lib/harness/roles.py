"""Token roles for the KV harnesses: validate the caller's masks and build the ones a scorer requires.

A role is a ``(T,)`` bool mask over the harness's input tokens (``AttentionView.roles``). Harnesses slice it to the
keys of every view. A scorer declares the roles it cannot work without in ``Scorer.requires_roles``; when the caller
passes none but gives a tokenizer, :func:`resolve_roles` builds those it knows how to build from token ids alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..scorers.base import Scorer
from ..scorers.separators import separator_mask

#: Roles a harness can build from ``(token_ids (T,), tokenizer)``; others must be passed explicitly.
ROLE_BUILDERS: dict[str, Callable[[torch.Tensor, object], torch.Tensor]] = {"separator": separator_mask}


def resolve_roles(scorer: Scorer, token_ids: torch.Tensor, roles: dict[str, torch.Tensor] | None = None,
                  tokenizer=None, *, what: str = "input_ids") -> dict[str, torch.Tensor]:
    """``{name: (T,) bool}`` on ``token_ids``' device: the caller's ``roles`` (checked), plus every role the scorer
    requires that is missing and buildable from ``token_ids`` ``(T,)`` with ``tokenizer``.

    Raises ValueError before any model work when a required role is still missing (no tokenizer, or no builder).
    """
    token_ids = token_ids.flatten()
    total = token_ids.shape[0]
    out: dict[str, torch.Tensor] = {}
    for name, mask in (roles or {}).items():
        mask = torch.as_tensor(mask, dtype=torch.bool, device=token_ids.device).flatten()
        if mask.shape[0] != total:
            raise ValueError(f"roles[{name!r}] must have one entry per token of {what} ({total}), got {mask.shape[0]}")
        out[name] = mask
    if tokenizer is not None:
        for name in sorted(scorer.requires_roles - out.keys()):
            if name in ROLE_BUILDERS:
                out[name] = ROLE_BUILDERS[name](token_ids.cpu(), tokenizer).to(token_ids.device)
    missing = sorted(scorer.requires_roles - out.keys())
    if missing:
        buildable = [name for name in missing if name in ROLE_BUILDERS]
        how = (f"pass tokenizer= to build {buildable} from the token ids, or " if buildable and tokenizer is None
               else "")
        raise ValueError(f"scorer {scorer.name!r} needs token role(s) {missing}: {how}pass roles={{name: (T,) bool "
                         f"mask}} for them; roles given: {sorted(out) or 'none'}")
    return out
