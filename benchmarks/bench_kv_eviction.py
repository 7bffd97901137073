#!/usr/bin/env python
"""Benchmark the per-decode-step cost of KV-cache scoring + eviction against the full cache, and the memory freed.

    python benchmarks/bench_kv_eviction.py --threads 1                     # 512 1024 2048, 16 steps, budget 50%
    python benchmarks/bench_kv_eviction.py --lengths 2048 --steps 48 --evict-every 1 16 --scorers recency

Model: SmolLM2-135M (``salience.models.load_model("smollm2-135m")``, float32, CPU, 30 layers, 9 / 3 KV heads). For
every context length L the model prefills L tokens of real text (Wikipedia articles from
``salience.data.wikipedia_articles`` concatenated until L tokens) into a ``DynamicCache``; every setting then starts
from its own clone of that cache and decodes single tokens of the same text (teacher forcing, absolute position ids,
as ``salience.harness.kv_streaming.stream_perplexity`` does with ``chunk_size=1``).

Settings (one row each; the scorer rows once per ``--scorers`` entry):
  eager         plain eager attention, full cache, no hook, no scoring. The baseline.
  hook          full cache, attention through the harness's capture hook (``capture_attention``) with a no-op
                callback: the hook's own cost (it materialises the float32 probabilities and calls back per layer).
  bookkeeping   full cache, hook + the streaming harness's per-layer bookkeeping (``LayerState.absorb``: running
                key mass + positions; attention-free scorers such as recency only append positions, without hook).
  evict         the cache is first evicted from L to the budget (once, not timed); then each step decodes one token
                with bookkeeping, and once the cache holds ``budget + evict_every`` entries calls the harness's
                ``evict_layers`` (score, top-k with sinks, gather keys/values), back to the budget: with
                ``evict_every`` = 1 (one row per ``--evict-every`` value) every step drops one token per layer, as
                ``stream_perplexity(chunk_size=1)`` does by default; with k > 1 every k-th step drops k tokens and
                the cache holds up to budget + k - 1 entries in between (``stream_perplexity(evict_every=k)``).
  eager_budget  plain eager with a cache of ``budget`` entries (the prefilled cache truncated to its first
                ``budget`` positions), no eviction: what a decode step costs at the evicted cache size.

What is measured (every setting has its own cache clone, and the settings run round robin, step i of all of them
before step i + 1, in a rotating order, so that the shared machine's load drift hits all settings alike). A *cycle*
is one step, except for ``evict`` rows with ``evict_every`` = k > 1, where it is the k steps from one eviction to the
next, eviction included; each time is the median over the complete cycles among the ``--steps`` steps after
``--warmup`` steps of the per-step mean within the cycle, so an amortised eviction is charged in full:
  time_ms        wall time of one decode step: the forward pass (callbacks included) plus, for ``evict``, the
                 ``evict_layers`` call. Switching the model to the capture hook and back happens outside it.
  cycles         how many complete cycles the medians are over.
  max_cache_len  the largest cache the setting held (after a step's forward pass, before its eviction): budget + 1
                 for ``evict_every`` = 1, budget + k with k.
  bookkeeping_ms (bookkeeping / evict rows) the time spent inside the per-layer bookkeeping (``absorb``, or the
                 position append for attention-free scorers), summed over the 30 layers: part of ``time_ms``.
  evict_ms       (evict rows) the ``evict_layers`` part of ``time_ms`` alone: scoring + selection + gather, 30 layers.
  machinery_pct  100 * (bookkeeping_ms + evict_ms) / time_ms(eager, same L): the directly timed cost of the
                 scorer's machinery as a share of a plain full-cache decode step. It leaves out the hook's own cost
                 beyond the callback (see the ``hook`` row) and any saving from attending over a smaller cache.
  overhead_pct   100 * (time_ms / time_ms(eager, same L) - 1): cost vs the full-cache baseline. For ``evict`` rows
                 this is net of the cheaper attention over a smaller cache.
  overhead_same_size_pct  (evict rows) 100 * (time_ms / time_ms(eager_budget) - 1): hook + bookkeeping + scoring +
                 eviction vs a plain step over a cache of the same size, i.e. the machinery's own cost.
  kv_mib_full / kv_mib_budget  sum over layers of keys.nbytes + values.nbytes before / after the bulk eviction;
                 kv_freed_frac = 1 - budget / full (measured), theory_frac = 1 - budget / L.
  rss_drop_mib   the process's resident set (VmRSS) before minus after the bulk eviction (after gc and
                 glibc malloc_trim(0)); rss_drop_notrim_mib the same before malloc_trim. Whether freed tensors go
                 back to the OS depends on the allocator; the numbers say what happened here.
  load_avg_1m    the machine's 1-minute load average after the setting ran.

Results go to a printed table and a CSV (default benchmarks/results/kv_eviction_<device>.csv).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scored_attention import RESULTS, environment, print_table, write_csv  # noqa: E402

COLUMNS = [
    "device", "threads", "torch", "model", "L", "budget", "scorer", "setting", "head_mode", "evict_every", "steps",
    "cycles",
    "max_cache_len", "time_ms", "bookkeeping_ms",
    "evict_ms", "machinery_pct", "overhead_pct", "overhead_same_size_pct", "kv_mib_full", "kv_mib_budget", "kv_freed_frac", "theory_frac",
    "rss_drop_notrim_mib", "rss_drop_mib", "load_avg_1m",
]  # fmt: skip


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def kv_bytes(cache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def text_tokens(tokenizer, n: int):
    """At least ``n`` token ids of real Wikipedia prose (articles concatenated in dump order)."""
    import torch

    from salience.data import wikipedia_articles

    ids: list[int] = []
    for row in wikipedia_articles():
        ids.extend(tokenizer(row["text"] + "\n\n", add_special_tokens=False)["input_ids"])
        if len(ids) >= n:
            break
    if len(ids) < n:
        raise SystemExit(f"only {len(ids)} tokens of Wikipedia text available, need {n}")
    return torch.tensor(ids[:n])[None]


def clone_cache(config, kv: list[tuple], upto: int | None = None):
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    for i, (k, v) in enumerate(kv):
        cache.update(k[:, :, :upto].clone(), v[:, :, :upto].clone(), i)
    return cache


def prefill(model, ids, decay: float | None):
    """Prefill ``ids`` (1, L); with ``decay`` set, through the capture hook, returning each layer's running state."""
    import torch
    from transformers import DynamicCache

    from salience.harness.attention_capture import capture_attention
    from salience.harness.kv_eviction import LayerState

    config = model.config
    cache = DynamicCache(config=config)
    states = [LayerState() for _ in range(config.num_hidden_layers)]
    positions = torch.arange(ids.shape[1])

    def on_attention(layer_idx, probs, key, value):
        states[layer_idx].absorb(probs, positions, decay)
        states[layer_idx].chunk_attention = None  # do not keep 30 layers of (H, L, L) probabilities alive

    with torch.inference_mode(), capture_attention(model, on_attention):
        model(ids, past_key_values=cache, position_ids=positions[None], use_cache=True)
    kv = [(layer.keys, layer.values) for layer in cache.layers]
    return kv, states


def copy_states(states, kv_heads: int | None = None):
    """Clones of the prefilled (shared) states; ``kv_heads`` set: per-KV-head states, every head holding the same
    positions until the first eviction makes them differ."""
    from salience.harness.kv_eviction import LayerState

    out = []
    for s in states:
        t = LayerState(kv_heads)
        t.mass = None if s.mass is None else s.mass.clone()
        t.positions = s.positions.clone() if kv_heads is None else s.positions[:, None].expand(-1, kv_heads, -1).clone()
        out.append(t)
    return out


class Setting:
    """One setting's own cache (and bookkeeping state); :meth:`step` decodes one token and returns its timings."""

    def __init__(self, model, kv, states, ids, L, *, setting, scorer, budget, n_sink, evict_every=1,
                 head_mode="shared"):
        import torch

        from salience.harness.kv_eviction import evict_layers, needs_attention

        self.model, self.ids, self.L, self.setting, self.scorer = model, ids, L, setting, scorer
        self.budget, self.n_sink, self.evict_every, self.head_mode = budget, n_sink, evict_every, head_mode
        kv_heads = None if head_mode == "shared" else model.config.num_key_value_heads
        self.max_cache_len = 0
        self.cycle: list[tuple[float, float, float]] | None = []  # (step, evict, bookkeeping) ms; None: incomplete
        self.uses_attention = scorer is not None and needs_attention(scorer)
        self.hooked = setting == "hook" or (setting in ("bookkeeping", "evict") and self.uses_attention)
        self.cache = clone_cache(model.config, kv, upto=budget if setting == "eager_budget" else None)
        self.layers = None
        if setting in ("bookkeeping", "evict"):
            self.layers = (copy_states(states, kv_heads) if self.uses_attention
                           else [_state_with_positions(L, kv_heads) for _ in kv])  # fmt: skip
        self.gen = torch.Generator().manual_seed(0)
        self.times, self.evict_times, self.callback_times = [], [], []  # per complete cycle, per-step means
        self.mem = {}
        if setting == "evict":  # bulk eviction L -> budget, untimed: the memory actually freed
            gc.collect()
            _malloc_trim()
            rss0, full = _rss_mib(), kv_bytes(self.cache)
            with torch.inference_mode():
                evict_layers(self.cache, self.layers, scorer, budget, n_sink, 0, L - 1, self.gen)
            after = kv_bytes(self.cache)
            gc.collect()
            rss1 = _rss_mib()
            _malloc_trim()
            rss2 = _rss_mib()
            self.mem = dict(kv_mib_full=full / 2**20, kv_mib_budget=after / 2**20, kv_freed_frac=1 - after / full,
                            theory_frac=1 - budget / L, rss_drop_notrim_mib=rss0 - rss1,
                            rss_drop_mib=rss0 - rss2)  # fmt: skip

    def step(self, i: int, record: bool) -> None:
        from contextlib import nullcontext

        import torch

        from salience.harness.attention_capture import capture_attention
        from salience.harness.kv_eviction import evict_layers

        pos = self.L + i
        positions = torch.tensor([pos])
        callback_s = [0.0]
        decay = float(self.scorer.mass_decay) if self.scorer is not None else 1.0

        def on_attention(layer_idx, probs, key, value):
            if self.layers is not None:
                c0 = time.perf_counter()
                self.layers[layer_idx].absorb(probs, positions, decay)
                callback_s[0] += time.perf_counter() - c0

        # entering / leaving the hook switches the model's attention implementation: outside the timed region
        with torch.inference_mode(), capture_attention(self.model, on_attention) if self.hooked else nullcontext():
            t0 = time.perf_counter()
            self.model(self.ids[:, pos : pos + 1], past_key_values=self.cache, position_ids=positions[None],
                       use_cache=True)  # fmt: skip
            if self.layers is not None and not self.uses_attention:
                c0 = time.perf_counter()
                for state in self.layers:
                    state.append_positions(positions)
                callback_s[0] += time.perf_counter() - c0
            t1 = time.perf_counter()
            length = self.cache.get_seq_length()
            evicts = self.setting == "evict" and length >= self.budget + self.evict_every
            if evicts:
                evict_layers(self.cache, self.layers, self.scorer, self.budget, self.n_sink, 0, pos, self.gen)
            t2 = time.perf_counter()
        self.max_cache_len = max(self.max_cache_len, length)
        if evicts:
            lengths = {layer.keys.shape[-2] for layer in self.cache.layers}
            if lengths != {self.budget}:
                raise RuntimeError(f"eviction left cache lengths {lengths}, expected {self.budget}")
        if self.cycle is not None:
            self.cycle.append(((t2 - t0) * 1e3, (t2 - t1) * 1e3, callback_s[0] * 1e3))
        if not record:
            self.cycle = None  # a cycle that began during warmup is not timed
        if evicts or self.setting != "evict":
            if self.cycle:
                n = len(self.cycle)
                self.times.append(sum(c[0] for c in self.cycle) / n)
                self.evict_times.append(sum(c[1] for c in self.cycle) / n)
                self.callback_times.append(sum(c[2] for c in self.cycle) / n)
            self.cycle = []

    def result(self) -> dict:
        if not self.times:
            raise SystemExit(f"{self.setting} (evict_every {self.evict_every}) completed no timed cycle: raise --steps")
        out = dict(time_ms=statistics.median(self.times), cycles=len(self.times), max_cache_len=self.max_cache_len,
                   **self.mem)
        if self.setting == "evict":
            out["evict_every"] = self.evict_every
        if self.layers is not None:
            out["bookkeeping_ms"] = statistics.median(self.callback_times)
        if self.setting == "evict":
            out["evict_ms"] = statistics.median(self.evict_times)
        return out


def _state_with_positions(L, kv_heads=None):
    import torch

    from salience.harness.kv_eviction import LayerState

    s = LayerState(kv_heads)
    s.append_positions(torch.arange(L))
    return s


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048], help="context lengths L (prefill)")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per setting (median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed decode steps before them")
    p.add_argument("--budget", type=float, default=0.5, help="cache budget as a fraction of L (or entries if > 1)")
    p.add_argument("--n-sink", type=int, default=4, help="protected initial positions (attention sinks)")
    p.add_argument("--scorers", nargs="+", default=["accumulated_attention", "normalized_attention", "recency"])
    p.add_argument("--evict-every", type=int, nargs="+", default=[1, 16],
                   help="evict rows: evict once the cache holds budget + k entries (one row per k)")
    p.add_argument("--head-modes", nargs="+", default=["shared"], choices=["shared", "per_kv_head"],
                   help="evict rows: one token set for all KV heads (shared) or one per KV head (one row per mode)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    p.add_argument("--out", type=Path, help="CSV path (default benchmarks/results/kv_eviction_cpu.csv)")
    args = p.parse_args(argv)
    if any(k < 1 for k in args.evict_every):
        p.error(f"--evict-every values must be >= 1, got {args.evict_every}")
    args.out = args.out or RESULTS / "kv_eviction_cpu.csv"
    return args


def main(argv=None) -> list[dict]:
    import torch

    from salience.models import load_model
    from salience.scorers import get_scorer

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    env = environment(threads)
    print(f"# KV eviction benchmark, {json.dumps(env)}", flush=True)
    bundle = load_model(args.model, attn_implementation="eager")
    model, tok = bundle.model, bundle.processor
    scorers = [get_scorer(name) for name in args.scorers]
    extra = args.warmup + args.steps
    ids = text_tokens(tok, max(args.lengths) + extra)
    rows = []
    for L in args.lengths:
        budget = int(args.budget * L) if args.budget <= 1 else int(args.budget)
        if not args.n_sink < budget < L:
            raise SystemExit(f"budget {budget} must lie between n_sink ({args.n_sink}) and L ({L})")
        t0 = time.perf_counter()
        prefilled = {}  # decay -> (kv, states)
        for scorer in scorers:
            prefilled.setdefault(float(scorer.mass_decay), None)
        for decay in prefilled:
            prefilled[decay] = prefill(model, ids[:, :L], decay)
        print(f"L={L}: prefill {time.perf_counter() - t0:.1f} s, budget {budget}", flush=True)
        kv, _ = next(iter(prefilled.values()))
        base = dict(device="cpu", threads=threads, torch=torch.__version__, model=args.model, L=L, budget=budget,
                    steps=args.steps)  # fmt: skip
        common = dict(budget=budget, n_sink=args.n_sink)
        plan = [("eager", None, 1, "shared"), ("hook", None, 1, "shared"), ("eager_budget", None, 1, "shared")]
        plan += [("bookkeeping", sc, 1, "shared") for sc in scorers]
        plan += [("evict", sc, k, mode) for sc in scorers for k in args.evict_every for mode in args.head_modes]
        runs = []
        for setting, scorer, k, mode in plan:
            kv_s, states = prefilled[float(scorer.mass_decay)] if scorer is not None else (kv, None)
            runs.append(Setting(model, kv_s, states, ids, L, setting=setting, scorer=scorer, evict_every=k,
                                head_mode=mode, **common))
        # round robin: step i of every setting before step i + 1 of any, in a rotating order, so that the shared
        # machine's load drifts over all settings alike instead of favouring whichever ran in a quiet moment
        for i in range(args.warmup + args.steps):
            shift = i % len(runs)
            for run in runs[shift:] + runs[:shift]:
                run.step(i, record=i >= args.warmup)
        load = round(os.getloadavg()[0], 2)
        group = []
        for run in runs:
            row = dict(base, scorer=run.scorer.name if run.scorer else "", setting=run.setting,
                       head_mode=run.head_mode, **run.result(), load_avg_1m=load)  # fmt: skip
            group.append(row)
            print(f"  {run.setting:12s} {row['scorer']:22s} {run.head_mode:11s} k={run.evict_every:<3d} "
                  f"{row['time_ms']:8.2f} ms"
                  + (f"  (bookkeeping {row['bookkeeping_ms']:.2f} ms)" if "bookkeeping_ms" in row else "")
                  + (f"  (evict {row['evict_ms']:.2f} ms)" if "evict_ms" in row else ""), flush=True)  # fmt: skip
        del runs
        ref = next(r["time_ms"] for r in group if r["setting"] == "eager")
        ref_budget = next(r["time_ms"] for r in group if r["setting"] == "eager_budget")
        for r in group:
            r["overhead_pct"] = 100 * (r["time_ms"] / ref - 1)
            if r["setting"] == "evict":
                r["overhead_same_size_pct"] = 100 * (r["time_ms"] / ref_budget - 1)
            if "bookkeeping_ms" in r:
                r["machinery_pct"] = 100 * (r["bookkeeping_ms"] + r.get("evict_ms", 0.0)) / ref
        rows.extend(group)
        del prefilled, kv
        gc.collect()
        write_csv(rows, COLUMNS, args.out)  # after every length: a long run keeps what it measured
    print()
    print_table(rows, ["L", "budget", "scorer", "setting", "head_mode", "evict_every", "max_cache_len", "time_ms",
                       "bookkeeping_ms",
                       "evict_ms", "machinery_pct",
                       "overhead_pct",
                       "overhead_same_size_pct", "load_avg_1m"])  # fmt: skip
    print()
    mem_rows = [r for r in rows if r["setting"] == "evict"]
    print_table(mem_rows, ["L", "budget", "scorer", "evict_every", "kv_mib_full", "kv_mib_budget", "kv_freed_frac",
                           "theory_frac", "rss_drop_notrim_mib", "rss_drop_mib"])  # fmt: skip
    print(f"\nwrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
