"""Visual-token reductions judged by readers, in the two settings, from one cached encoder pass per image.

**Settings.** ``after_encoder`` (the VLM papers: FasterVLM, VTC-CLS, VisionZip, FlowCut, HiPrune, DivPrune, DART,
ToDRE, G-Prune): the encoder runs once on every token; scorers read that pass; the reduction picks (drop) or merges
(ToMe, VisionZip) the encoder's *output* patch tokens, and the reader reads what is kept. Nothing is re-run: a
reduction is a selection over cached tensors. ``in_encoder`` (EViT / ToMe): the tokens are reduced after block ``l``
and blocks ``l+1..L`` really run on fewer tokens; the prefix (block ``l``'s output and keys) and the scores at ``l``
come from the same cached pass, the suffix runs per reduction.

**Shared work.** :class:`VisionBench` computes, once per (model, image set, layer, code), the output tokens, the
head-averaged keys of the scoring layer, block ``l``'s output and keys for in-encoder layers, and every scorer's
scores, and keeps them in the activation cache (:mod:`salience.activation_cache`), so every scorer, reader, budget
and notebook reuses them (what keys them: :mod:`salience.vision_entries`). Scorers that read nothing from the model
(random, spatial grid) are computed directly; each replicate of a stochastic scorer gets its own seed, and so does
each batch of images.

**Output.** One tidy per-image table: setting, layer, entry, method, keep, tokens (patch tokens the reader sees),
replicate, image, label, reader, p_true (probability of the true class), correct; the unpruned reference is entry
``unpruned`` (setting ``none``, keep 1). The same readers on the *train* images give :meth:`VisionBench.train_table`
(same columns), where notebooks choose their baselines, so the test images only judge. See
:mod:`salience.vision_readers` for the three readers and :mod:`salience.vision_tables` for summaries of the table.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters
from tqdm import tqdm  # text bars: stored notebooks stay readable without widgets

from . import activation_cache as ac
from . import vision_readers, vision_tasks
from .harness.token_merging import CONTEXTUAL, merge_by_destination, reduction_map
from .harness.vit_encoder import ScoreRequest, encode, prefix_from
from .harness.vit_model import estimate_flops, vit_parts
from .harness.vit_pruning import reduce_and_finish, replicate_seed
from .models.dinov2 import IMAGENET_MEAN, IMAGENET_STD
from .selection import resolve_budget
from .validation import check_keep, check_layer
from .vision_entries import (
    EncodedSet,
    Entry,
    drop_entries,
    encoder_code,
    model_free_scores,
    scores_code,
    scores_name,
)
from .vision_readers import (
    AttentionPoolReader,
    KeptTokens,
    ReaderSettings,
    class_count,
    fit_probe,
    probe_proba,
    train_attention_reader,
    true_class,
)
from .vision_tables import per_image_metric, reader_wide, summary

SETTINGS = ("after_encoder", "in_encoder")
SETTING_TEXT = {
    "after_encoder": "after-encoder (the encoder runs on every token; its output patch tokens are reduced)",
    "in_encoder": "in-encoder (tokens reduced after block l; the later blocks run on fewer tokens)",
}
#: the columns that name one configuration of a per-image table
CONFIG = ("setting", "layer", "entry", "keep", "replicate")


# ----------------------------------------------------------------------------------------------------- the bench
class VisionBench:
    """Encoded train / test digits, trained readers, and reductions evaluated in both settings.

    >>> bench = VisionBench(model, dataset="mnist", image_size=112, n_train=1000, n_test=1000, seed=0, batch_size=100,
    ...                     readers=ReaderSettings(**params.reader.model_dump()))
    >>> bench.prepare(entries, in_encoder_layers=[9])        # cache hit: seconds; miss: one pass per image
    >>> table = pd.concat([bench.unpruned_rows(), bench.after_encoder(entries, [0.25, 0.1], replicates=3)])
    >>> train = bench.train_table()   # the same readers on the train images: where baselines are chosen
    """

    def __init__(self, model, *, dataset: str, image_size: int, n_train: int, n_test: int, seed: int,
                 batch_size: int, readers: ReaderSettings, desc: bool = True):
        vision_tasks.check_size(image_size, vit_parts(model).patch_size)
        self.model = model
        self.parts = vit_parts(model)
        self.seed = seed
        self.batch_size = batch_size
        self.settings = readers
        self.desc = desc
        self.depth = self.parts.depth
        self.specs = {
            split: ac.ImageSetSpec(dataset, split, n, image_size, seed, tuple(IMAGENET_MEAN), tuple(IMAGENET_STD))
            for split, n in (("train", n_train), ("test", n_test))}
        self.sets: dict[str, EncodedSet] = {}
        self.seconds: dict[str, float] = {}
        self._reader = self._cls_probe = None
        self._train_rows: dict[tuple, pd.DataFrame] = {}

    # --------------------------------------------------------------------------------------------- encoding
    def _store(self, split: str) -> ac.ActivationStore:
        return ac.ActivationStore(ac.cache_root(), ac.model_fingerprint(self.model), self.specs[split])

    def _salt(self, split: str) -> int:
        """Per-split offset of the stochastic scorers' seeds (train and test draw differently)."""
        return int(self.specs[split].key()[:8], 16)

    def _pixels(self, split: str):
        s = self.specs[split]
        return vision_tasks.digit_pixels(s.dataset, split, n=s.n, size=s.size, seed=s.seed, mean=list(s.mean),
                                         std=list(s.std))

    def prepare(self, entries: Sequence[Entry], *, in_encoder_layers: Sequence[int] = (), replicates: int = 1,
                in_encoder_entries: Sequence[Entry] | None = None,
                prefetch: Sequence[tuple[Sequence[Entry], Sequence[int]]] = ()) -> None:
        """Load (or compute once and cache) everything the entries read, for the train and test sets: every entry's
        scores at the scoring layer, block outputs, keys and the ``in_encoder_entries``' scores (default: all) at
        each of ``in_encoder_layers``.

        ``prefetch``: further ``(entries, in-encoder layers)`` groups (e.g. the other notebooks' on the same image
        sets), computed in the same pass when anything is missing, so whichever notebook runs first pays for the
        others; on a cache hit they cost nothing.
        """
        layers = sorted({*in_encoder_layers, *(layer for _, group in prefetch for layer in group)})
        for layer in layers:
            check_layer(layer, self.depth)
        if replicates < 1:
            raise ValueError(f"replicates must be >= 1, got {replicates}")
        own = [(entries, ()), (list(entries) if in_encoder_entries is None else in_encoder_entries,
                               tuple(in_encoder_layers))]
        start = time.process_time()
        for split in ("train", "test"):
            self.sets[split] = self._encoded(split, own, list(in_encoder_layers), replicates,
                                             [*own, *((g, tuple(ls)) for g, ls in prefetch)])
        self.seconds["prepare_cpu"] = self.seconds.get("prepare_cpu", 0.0) + time.process_time() - start

    def _wanted(self, split, groups, hidden_layers, replicates) -> tuple[dict[str, str], dict[str, ScoreRequest]]:
        """``({array name: code hash}, {scores name: request})``: output tokens and labels, block outputs and keys
        of ``hidden_layers``, and for every ``(entries, layers)`` group each entry's scores at the scoring layer and
        at those layers (a stochastic entry's once per replicate, each with its own seed)."""
        base = encoder_code()
        wanted = {"tokens": base, "labels": base}
        for layer in hidden_layers:
            wanted[f"hidden@{layer}"] = base
        for layer in {self.depth, *hidden_layers}:
            wanted[f"keys@{layer}"] = base
        requests: dict[str, ScoreRequest] = {}
        for group, layers in groups:
            for e in group:
                if e.scorer is None or e.model_free:
                    continue
                code = scores_code(e.scorer, self.batch_size)
                for layer in [self.depth, *layers]:
                    for r in range(replicates) if e.stochastic else [None]:
                        name = scores_name(e.scorer, layer, r)
                        seed = self.seed if r is None else replicate_seed(self.seed + self._salt(split), r, layer)
                        wanted[name] = code
                        requests[name] = ScoreRequest(e.scorer, layer, seed=seed)
        return wanted, requests

    def _encoded(self, split, own, hidden_layers, replicates, prefetch) -> EncodedSet:
        store = self._store(split)
        wanted, requests = self._wanted(split, own, hidden_layers, replicates)
        with store.lock():
            arrays = {name: store.load(name, code) for name, code in wanted.items()}
            missing = [name for name, a in arrays.items() if a is None]
            if missing:
                all_layers = sorted({*hidden_layers, *(layer for _, group in prefetch for layer in group)})
                extra, extra_requests = self._wanted(split, prefetch, all_layers, replicates)
                codes = {**extra, **wanted}
                missing += [n for n, code in extra.items() if n not in wanted and not store.has(n, code)]
                computed = self._compute(split, missing, {**extra_requests, **requests})
                for name in missing:
                    store.save(name, codes[name], computed[name])
                arrays.update({name: computed[name] for name in wanted if arrays[name] is None})
        tokens = torch.from_numpy(arrays["tokens"])
        grid = (self.specs[split].size // self.parts.patch_size,) * 2
        out = EncodedSet(self.specs[split], arrays["labels"], tokens, tokens.shape[1] - grid[0] * grid[1], grid)
        for layer in hidden_layers:
            out.hidden[layer] = torch.from_numpy(arrays[f"hidden@{layer}"])
        for layer in {self.depth, *hidden_layers}:
            out.keys[layer] = torch.from_numpy(arrays[f"keys@{layer}"])
        for group, layers in own:
            for e, layer in ((e, layer) for e in group for layer in [self.depth, *layers] if e.scorer is not None):
                for r in range(replicates if e.stochastic else 1):
                    if e.model_free:
                        scores = model_free_scores(e.scorer, len(out), tokens.shape[1], out.n_prefix, grid,
                                                   replicate_seed(self.seed + self._salt(split), r, layer))
                    else:
                        scores = torch.from_numpy(arrays[scores_name(e.scorer, layer, r if e.stochastic else None)])
                    out.scores[(e.label, layer, r)] = scores
        return out

    def _compute(self, split, missing, requests) -> dict[str, np.ndarray]:
        """One full encoder pass per batch of images, recording exactly the missing arrays. Stochastic scorers draw
        with a seed per batch (:func:`replicate_seed` of the request's seed and the batch index), so batches differ."""
        pixels, labels = self._pixels(split)
        device = next(self.model.parameters()).device
        want_scores = {n: r for n, r in requests.items() if n in missing}
        key_layers = [int(n.split("@")[1]) for n in missing if n.startswith("keys@")]
        hid_layers = [int(n.split("@")[1]) for n in missing if n.startswith("hidden@")]
        parts: dict[str, list[np.ndarray]] = {n: [] for n in missing if n != "labels"}
        batches = range(0, len(pixels), self.batch_size)
        for index, i in enumerate(tqdm(batches, desc=f"encoding {split} images (cached afterwards)",
                                       disable=not self.desc)):
            batch_scores = {n: dataclasses.replace(r, seed=replicate_seed(r.seed, 0, index))
                            for n, r in want_scores.items()}
            out = encode(self.model, pixels[i:i + self.batch_size].to(device), scores=batch_scores,
                         hidden_layers=hid_layers, key_layers=key_layers)
            for name in parts:
                if name == "tokens":
                    t = out.tokens
                elif name.startswith("hidden@"):
                    t = out.hidden[int(name.split("@")[1])]
                elif name.startswith("keys@"):
                    t = out.keys[int(name.split("@")[1])]
                else:
                    t = out.scores[name]
                parts[name].append(t.float().cpu().numpy())
        arrays = {name: np.concatenate(chunks) for name, chunks in parts.items()}
        if "labels" in missing:
            arrays["labels"] = np.asarray(labels, dtype=np.int64)
        return arrays

    # ---------------------------------------------------------------------------------------------- readers
    def train_readers(self) -> None:
        """Train the attention-pooling reader on the unpruned train tokens (cached with the activations: it depends
        only on them, its settings and its seed) and the [CLS] probe on the train [CLS] tokens."""
        start = time.process_time()
        train = self.sets["train"]
        s = self.settings
        store = self._store("train")
        code = encoder_code(vision_readers, extra=repr((s, self.seed)))
        weights = store.load("reader-attention_pool", code)
        if weights is None:
            self._reader = train_attention_reader(train.unpruned(), train.labels, s, seed=self.seed)
            store.save("reader-attention_pool", code, parameters_to_vector(self._reader.parameters()).detach().numpy())
        else:
            self._reader = AttentionPoolReader(train.tokens.shape[-1], class_count(train.labels), heads=s.heads,
                                               key_dim=s.key_dim)
            vector_to_parameters(torch.from_numpy(weights), self._reader.parameters())
            self._reader.eval()
        if train.has_cls:
            self._cls_probe = fit_probe(train.tokens[:, 0].numpy(), train.labels, C=s.probe_c, seed=self.seed)
        self.seconds["readers_cpu"] = time.process_time() - start

    def readings(self, train: KeptTokens, test: KeptTokens) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
        """``{split: {reader: (p_true, correct)}}``: every reader on the test images (what claims are judged on) and
        on the train images (where baselines are chosen). The retrained probe is fitted on ``train`` (its train
        values are in-sample); the attention reader and the [CLS] probe were trained on the unpruned train tokens."""
        if self._reader is None:
            self.train_readers()
        probe = fit_probe(train.mean().numpy(), self.sets["train"].labels, C=self.settings.probe_c, seed=self.seed)
        out = {}
        for split, kept in (("train", train), ("test", test)):
            labels = self.sets[split].labels
            out[split] = {"attention_pool": true_class(self._reader.proba(kept), labels),
                          "retrained_mean": true_class(probe_proba(probe, kept.mean().numpy()), labels,
                                                       probe.classes_)}
            if self._cls_probe is not None and kept.cls is not None:
                out[split]["cls_probe"] = true_class(probe_proba(self._cls_probe, kept.cls.numpy()), labels,
                                                     self._cls_probe.classes_)
        return out

    def _rows(self, readings, **config) -> pd.DataFrame:
        """The test rows of one configuration (returned); its train rows are kept for :meth:`train_table`."""
        frames = {}
        for split in ("train", "test"):
            labels = self.sets[split].labels
            frames[split] = pd.concat([pd.DataFrame(dict(config, image=np.arange(len(labels)), label=labels,
                                                         reader=reader, p_true=p, correct=c))
                                       for reader, (p, c) in readings[split].items()], ignore_index=True)
        self._train_rows[tuple(config[k] for k in CONFIG)] = frames["train"]
        return frames["test"]

    def train_table(self) -> pd.DataFrame:
        """Per-image rows of the *train* images for every configuration read so far (the test table's columns): a
        notebook chooses its baselines here, so the test images only judge them."""
        if not self._train_rows:
            raise ValueError("no configuration has been read yet: call unpruned_rows / after_encoder / in_encoder")
        return pd.concat(self._train_rows.values(), ignore_index=True)

    def unpruned_rows(self) -> pd.DataFrame:
        """The reference: every reader on the unpruned output tokens (entry ``unpruned``, keep 1)."""
        train, test = self.sets["train"], self.sets["test"]
        n = test.tokens.shape[1] - test.n_prefix
        return self._rows(self.readings(train.unpruned(), test.unpruned()), setting="none", layer=self.depth,
                          entry="unpruned", method="none", keep=1.0, tokens=n, replicate=0, flops_ratio=1.0)

    # ------------------------------------------------------------------------------------------ after encoder
    def after_encoder_tokens(self, split: str, entry: Entry, keep: float, replicate: int = 0,
                             contextual: float = CONTEXTUAL) -> KeptTokens:
        """The kept / merged output tokens of every image of ``split``: a selection over cached tensors."""
        s = self.sets[split]
        n, k, _ = s.tokens.shape
        protected = torch.zeros(n, k, dtype=torch.bool)
        protected[:, :s.n_prefix] = True
        budget = resolve_budget(keep, k - s.n_prefix)
        scores = None if entry.scorer is None else s.scores[(entry.label, self.depth, replicate)]
        dest, survives = reduction_map(entry.method, budget, protected, scores=scores, metric=s.keys[self.depth],
                                       contextual=contextual)
        n_out = s.n_prefix + budget
        if entry.method == "drop":  # a plain selection: gather the survivors
            tokens, sizes = s.tokens[survives].view(n, n_out, -1), torch.ones(n, n_out)
        else:
            tokens, sizes = merge_by_destination(s.tokens, torch.ones(n, k), dest, n_out)
        return KeptTokens(tokens[:, s.n_prefix:], sizes[:, s.n_prefix:], s.tokens[:, 0] if s.has_cls else None)

    def after_encoder(self, entries: Sequence[Entry], keeps: Sequence[float], *, replicates: int = 1,
                      contextual: float = CONTEXTUAL) -> pd.DataFrame:
        """Per-image reader outputs of every entry × kept share in the after-encoder setting."""
        for keep in keeps:
            check_keep(float(keep))
        frames = []
        jobs = [(e, float(keep), r) for e in entries for keep in keeps for r in range(replicates if e.stochastic
                                                                                        else 1)]
        for e, keep, r in tqdm(jobs, desc="after-encoder reductions", disable=not self.desc):
            train = self.after_encoder_tokens("train", e, keep, r, contextual)
            test = self.after_encoder_tokens("test", e, keep, r, contextual)
            frames.append(self._rows(self.readings(train, test), setting="after_encoder", layer=self.depth,
                                     entry=e.label, method=e.method, keep=keep, tokens=test.n_tokens, replicate=r,
                                     flops_ratio=1.0))
        return pd.concat(frames, ignore_index=True)

    # ------------------------------------------------------------------------------------------- in encoder
    def in_encoder_tokens(self, split: str, entry: Entry, keep: float, layer: int, replicate: int = 0, *,
                          proportional_attention: bool = True,
                          contextual: float = CONTEXTUAL) -> tuple[KeptTokens, float]:
        """Blocks ``layer+1..L`` run on the reduced tokens of every image of ``split`` (the prefix and the scores
        come from the cache). Returns the output tokens and the FLOPs per image relative to the unreduced pass."""
        s = self.sets[split]
        device = next(self.model.parameters()).device
        patches, sizes, cls, flops = [], [], [], None
        k = s.tokens.shape[1]
        # the later blocks see few tokens: batch more images so their matrices stay large (same memory per batch)
        step = self.batch_size * max(1, k // (s.n_prefix + resolve_budget(keep, k - s.n_prefix)))
        for i in range(0, len(s), step):
            sl = slice(i, i + step)
            prefix = prefix_from(s.hidden[layer][sl].to(device), s.keys[layer][sl].to(device), layer,
                                 depth=self.depth, n_prefix=s.n_prefix, grid=s.grid)
            scores = None if entry.scorer is None else s.scores[(entry.label, layer, replicate)][sl].to(device)
            res = reduce_and_finish(self.model, prefix, entry.scorer, keep, entry.method, scores=scores,
                                    proportional_attention=proportional_attention, contextual=contextual,
                                    seed=replicate_seed(self.seed, replicate, i))
            patches.append(res.patches.float().cpu())
            sizes.append(res.patch_sizes.float().cpu())
            cls.append(None if res.cls is None else res.cls.float().cpu())
            flops = res.flops
        full = estimate_flops(self.parts.config, [s.tokens.shape[1]] * self.depth, s.grid[0] * s.grid[1])
        kept = KeptTokens(torch.cat(patches), torch.cat(sizes), None if cls[0] is None else torch.cat(cls))
        return kept, flops / full

    def in_encoder(self, entries: Sequence[Entry], keeps: Sequence[float], layer: int, *, replicates: int = 1,
                   proportional_attention: bool = True, contextual: float = CONTEXTUAL) -> pd.DataFrame:
        """Per-image reader outputs of every entry × kept share, reduced after block ``layer``."""
        check_layer(layer, self.depth)
        for keep in keeps:
            check_keep(float(keep))
        frames = []
        jobs = [(e, float(keep), r) for e in entries for keep in keeps for r in range(replicates if e.stochastic
                                                                                        else 1)]
        opts = dict(proportional_attention=proportional_attention, contextual=contextual)
        for e, keep, r in tqdm(jobs, desc=f"in-encoder reductions after block {layer}", disable=not self.desc):
            train, _ = self.in_encoder_tokens("train", e, keep, layer, r, **opts)
            test, flops_ratio = self.in_encoder_tokens("test", e, keep, layer, r, **opts)
            frames.append(self._rows(self.readings(train, test), setting="in_encoder", layer=layer, entry=e.label,
                                     method=e.method, keep=keep, tokens=test.n_tokens, replicate=r,
                                     flops_ratio=flops_ratio))
        return pd.concat(frames, ignore_index=True)


__all__ = ["SETTINGS", "SETTING_TEXT", "EncodedSet", "Entry", "ReaderSettings", "VisionBench", "drop_entries",
           "per_image_metric", "reader_wide", "summary"]
