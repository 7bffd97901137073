"""What the explanation scorers (family C) run: a model, its inputs and one scalar per example to explain.

Captured attention is enough for raw attention, rollout and flow. Gradient × input, integrated gradients,
attention × gradient, occlusion and GlobEnc need the model itself: an :class:`AttributionTarget` holds it with the
``(B, K)`` inputs, the input embeddings ``(B, K, d)`` and a differentiable readout ``f(embeddings) → (B,)`` (by default
the probability of the class, or next token, the model predicts on the unperturbed input). The view carries it as
``AttentionView.attribution_target``; :func:`explanation_view` builds that view in one forward pass.

>>> target = attribution_target(model, tokenizer=tokenizer, text="a fine film", baseline_token="[MASK]")
>>> view = explanation_view(target, tokenizer=tokenizer)          # attention of every layer, hidden, [CLS] role
>>> get_scorer("integrated_gradients")(view)                       # (1, 1, K)

Bad input fails here, in one error naming what to change: an empty text, a baseline token the tokenizer does not
know, attention requested from a model whose attention implementation returns no weights (SDPA, flash), gradients
requested under ``torch.no_grad()`` / ``torch.inference_mode()`` or from a model that gives none (a quantized or
detached path).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..validation import check_choice
from .base import AttentionView

#: what the default readout takes of the predicted class's (or next token's) logit
OUTPUTS = ("probability", "log_probability", "logit")
#: attention implementations that return the attention probabilities (the harness's one hook returns them only in
#: its capture mode, inside a capture block, so a model configured with it is not counted)
WEIGHT_RETURNING_ATTENTION = ("eager",)

Readout = Callable[[object, torch.Tensor], torch.Tensor]


def require_attention_weights(model: nn.Module, who: str) -> None:
    """Raise unless ``model`` returns its attention probabilities (``output_attentions=True``)."""
    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation not in WEIGHT_RETURNING_ATTENTION:
        raise ValueError(f"{who} needs attention weights, which attn_implementation={implementation!r} does not "
                         "return: load the model with attn_implementation='eager' (load_model(..., "
                         "attn_implementation='eager')) or call model.set_attn_implementation('eager')")


def check_token_id(token: int | str, tokenizer=None, vocab_size: int | None = None,
                   what: str = "baseline token") -> int:
    """The id of ``token`` (a token string or an id), checked against the tokenizer's vocabulary and the model's
    embedding table; raises ValueError naming the token when either does not know it."""
    if isinstance(token, str):
        if tokenizer is None:
            raise ValueError(f"{what} {token!r} is a string: pass tokenizer= to look it up, or give its id")
        vocab = tokenizer.get_vocab()
        if token not in vocab:
            raise ValueError(f"{what} {token!r} is not in the tokenizer's vocabulary; use one it has, e.g. "
                             f"{_special_tokens(tokenizer)}")
        token_id = int(vocab[token])
    elif isinstance(token, bool) or not isinstance(token, int):
        raise ValueError(f"{what} must be a token string or an int id, got {token!r}")
    else:
        token_id = token
    if token_id < 0 or (tokenizer is not None and token_id >= len(tokenizer)):
        known = f" (its ids run from 0 to {len(tokenizer) - 1})" if tokenizer is not None else ""
        raise ValueError(f"{what} id {token_id} is unknown to the tokenizer{known}")
    if vocab_size is not None and token_id >= vocab_size:
        raise ValueError(f"{what} id {token_id} is outside the model's embedding table ({vocab_size} rows)")
    return token_id


def _special_tokens(tokenizer) -> list[str]:
    names = ("mask_token", "pad_token", "unk_token", "eos_token")
    return [t for t in (getattr(tokenizer, n, None) for n in names) if t]


@dataclass
class AttributionTarget:
    """The model, its inputs and the scalar per example that the attributions explain.

    Attributes:
        model: a Hugging Face model (anything taking ``inputs_embeds=`` and ``attention_mask=`` and exposing
            ``get_input_embeddings()``), in eval mode.
        input_ids: ``(B, K)`` token ids; attention_mask: ``(B, K)`` 1 for real tokens.
        target_index: ``(B,)`` class (classifier logits ``(B, C)``) or next-token id (causal-LM logits
            ``(B, K, V)``, read at each row's last real token) whose ``output`` is explained.
        output: ``"probability"`` (ERASER's quantity), ``"log_probability"`` or ``"logit"``.
        readout: optional ``readout(model_outputs, attention_mask) → (B',)`` replacing the logit readout (for models
            without logits, e.g. a sentence encoder); ``target_index`` and ``output`` are then unused.
        baseline_token_id: the token whose embedding stands in for an occluded token (occlusion, IG's
            ``baseline="token"``); ``None`` when none was declared.
        embeddings: ``(B, K, d)`` input embeddings of ``input_ids`` (detached), set on construction.
    """

    model: nn.Module
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target_index: torch.Tensor | None = None
    output: str = "probability"
    readout: Readout | None = None
    baseline_token_id: int | None = None
    #: passed to every forward of the model (e.g. ``{"logits_to_keep": m}`` when the readout reads the last ``m``
    #: rows only: a causal LM then skips the vocabulary projection of the others)
    model_kwargs: dict = field(default_factory=dict)
    embeddings: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        check_choice(self.output, OUTPUTS, "output")
        with torch.no_grad():
            self.embeddings = self.embed(self.input_ids).detach()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(N, K, d)`` input embeddings of ``input_ids`` ``(N, K)`` (the model's own lookup table)."""
        return self.model.get_input_embeddings()(input_ids)

    def baseline_embeddings(self, who: str) -> torch.Tensor:
        """``(B, K, d)``: every position holding the baseline token's embedding."""
        if self.baseline_token_id is None:
            raise ValueError(f"{who} replaces tokens by the baseline token, and the attribution target declares none: "
                             "build it with baseline_token= (e.g. '[MASK]' or the pad token)")
        with torch.no_grad():
            return self.embed(torch.full_like(self.input_ids, self.baseline_token_id)).detach()

    def run(self, embeddings: torch.Tensor, attention_mask: torch.Tensor, **model_kwargs):
        """``(values (N,), model outputs)`` for ``N = m·B`` rows (captum stacks ``m`` copies of the batch, step-major,
        so row ``r`` explains example ``r mod B``)."""
        outputs = self.model(inputs_embeds=embeddings, attention_mask=attention_mask,
                             **{**self.model_kwargs, **model_kwargs})
        if self.readout is not None:
            return self.readout(outputs, attention_mask), outputs
        index = self.target_index.to(embeddings.device)
        copies, rest = divmod(embeddings.shape[0], index.shape[0])
        if rest:
            raise ValueError(f"{embeddings.shape[0]} rows are not a whole number of copies of the {index.shape[0]} "
                             "examples the target explains")
        return _pick(outputs.logits, attention_mask, index.repeat(copies), self.output), outputs

    def forward(self, embeddings: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(N,)`` readout from embeddings (the forward function handed to captum)."""
        return self.run(embeddings, attention_mask)[0]

    def example(self, index: int) -> "AttributionTarget":
        """The same target restricted to example ``index`` (batch of one)."""
        rows = slice(index, index + 1)
        return replace(self, input_ids=self.input_ids[rows], attention_mask=self.attention_mask[rows],
                       target_index=None if self.target_index is None else self.target_index[rows])

    def predictor(self, example: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``predict(ids (N, K'), mask (N, K')) → (N,)`` for variants of one example (what faithfulness calls)."""
        row = self.example(example)

        def predict(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            device = row.input_ids.device  # faithfulness builds its variants on the CPU
            with torch.no_grad():
                return row.forward(row.embed(input_ids.to(device)), attention_mask.to(device)).float()
        return predict

    def require_gradients(self, who: str) -> None:
        """Raise unless the readout is differentiable with respect to the input embeddings here and now."""
        if torch.is_inference_mode_enabled() or not torch.is_grad_enabled():
            raise ValueError(f"{who} needs gradients, and it runs under torch.no_grad() or torch.inference_mode(): "
                             "call it outside those blocks (or inside torch.enable_grad())")
        first = self.example(0)
        value = first.forward(first.embeddings.clone().requires_grad_(True), first.attention_mask)
        if not value.requires_grad:
            raise ValueError(f"{who} needs gradients of the readout with respect to the input embeddings, and this "
                             f"model gives none (a quantized or no-grad path in {type(self.model).__name__}): load "
                             "it unquantized in a float dtype (load_model(..., dtype=torch.float32)), with no "
                             "torch.no_grad() inside its forward, or use an attention-based or occlusion scorer")


def _final_logits(logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``(N, C)``: classifier logits as they are, causal-LM logits ``(N, K, V)`` at each row's last real token."""
    if logits.dim() == 2:
        return logits
    positions = torch.arange(logits.shape[1], device=logits.device)
    last = (attention_mask.to(logits.device) * positions).argmax(dim=-1)
    return logits[torch.arange(logits.shape[0], device=logits.device), last]


def _pick(logits: torch.Tensor, attention_mask: torch.Tensor, index: torch.Tensor, output: str) -> torch.Tensor:
    """``(N,)`` ``output`` of class ``index`` from classifier logits ``(N, C)`` or, at each row's last real token,
    from causal-LM logits ``(N, K, V)``."""
    logits = _final_logits(logits, attention_mask).float()
    if output == "logit":
        chosen = logits
    elif output == "probability":
        chosen = logits.softmax(dim=-1)
    else:
        chosen = logits.log_softmax(dim=-1)
    return chosen.gather(-1, index[:, None]).squeeze(-1)


def attribution_target(
    model: nn.Module,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    text: str | list[str] | None = None,
    tokenizer=None,
    target_index: int | torch.Tensor | None = None,
    output: str = "probability",
    readout: Readout | None = None,
    baseline_token: int | str | None = None,
    model_kwargs: dict | None = None,
) -> AttributionTarget:
    """Build an :class:`AttributionTarget` from ``input_ids`` ``(B, K)`` (or ``text`` with ``tokenizer``).

    ``target_index=None`` explains the class (or next token) the model predicts on the full input. ``model_kwargs``
    go to every forward (with a ``readout`` only: the default readout reads every row's logits). ``baseline_token``
    (a token string or id, e.g. ``"[MASK]"``) is checked against ``tokenizer`` and the embedding table. Raises
    ValueError for an empty text or input, a baseline token the tokenizer does not know, or a model without logits
    and no ``readout``.
    """
    if (input_ids is None) == (text is None):
        raise ValueError("give exactly one of input_ids and text")
    if text is not None:
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or any(not t.strip() for t in texts):
            raise ValueError("empty text: there is nothing to attribute; give at least one non-blank text")
        if tokenizer is None:
            raise ValueError("text needs tokenizer= to become input_ids")
        encoded = tokenizer(texts, return_tensors="pt", padding=True)
        input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
    input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError(f"input_ids must be a non-empty (B, K) tensor, got shape {tuple(input_ids.shape)}: "
                         "there is nothing to attribute")
    device = model.get_input_embeddings().weight.device
    input_ids = input_ids.to(device)
    mask = torch.ones_like(input_ids) if attention_mask is None else torch.as_tensor(attention_mask).to(device)
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(mask.shape)} must match input_ids {tuple(input_ids.shape)}")
    if bool((mask.sum(dim=-1) == 0).any()):
        raise ValueError("an example has no real token (attention_mask all zero): there is nothing to attribute")
    vocab_size = model.get_input_embeddings().weight.shape[0]
    baseline_id = None if baseline_token is None else check_token_id(baseline_token, tokenizer, vocab_size)
    target = AttributionTarget(model, input_ids, mask, None, output, readout, baseline_id, dict(model_kwargs or {}))
    if readout is None:
        if model_kwargs:
            raise ValueError("model_kwargs change what the model returns: give them with a readout that reads it")
        with torch.no_grad():
            outputs = model(inputs_embeds=target.embeddings, attention_mask=mask)
        logits = getattr(outputs, "logits", None)
        if logits is None:
            raise ValueError(f"{type(model).__name__} returns no logits: pass readout=fn(outputs, attention_mask) → "
                             "(B,) (e.g. a probe on the pooled output), or use a model with a classification / LM head")
        if target_index is None:
            target_index = _final_logits(logits, mask).argmax(dim=-1)
        target.target_index = torch.as_tensor(target_index, device=device).long().reshape(-1).expand(
            input_ids.shape[0]).clone()
    return target


def explanation_view(target: AttributionTarget, *, attention: bool = True, tokenizer=None) -> AttentionView:
    """One forward pass of ``target``'s inputs → an :class:`AttentionView` for every explanation scorer.

    Holds the attention of every layer (``attention_layers``, ``attention`` the last; needs a weight-returning
    attention implementation, see :func:`require_attention_weights`) unless ``attention=False``, the last hidden states,
    ``roles["cls"]`` when ``tokenizer`` has a [CLS] token that every row starts with, and the target itself. Keys and
    queries are the ``K`` input positions (a padded batch: pad on the side that keeps each example's target row in
    place, left for causal LMs).
    """
    model = target.model
    if attention:
        require_attention_weights(model, "explanation_view (attention of every layer)")
    with torch.no_grad():
        outputs = model(inputs_embeds=target.embeddings, attention_mask=target.attention_mask,
                        output_attentions=attention, output_hidden_states=True)
    layers = [a.float() for a in outputs.attentions] if attention else None
    k = target.input_ids.shape[1]
    positions = torch.arange(k, device=target.input_ids.device)
    roles = {}
    cls_id = getattr(tokenizer, "cls_token_id", None)
    if cls_id is not None and bool((target.input_ids[:, 0] == cls_id).all()):
        roles["cls"] = positions == 0
    hidden = outputs.hidden_states[-1] if outputs.hidden_states else None
    return AttentionView(key_positions=positions, query_positions=positions,
                         attention=layers[-1] if layers else None, attention_layers=layers, hidden=hidden,
                         roles=roles, attribution_target=target)


__all__ = ["AttributionTarget", "OUTPUTS", "attribution_target", "check_token_id", "explanation_view",
           "require_attention_weights"]
