#!/usr/bin/env python
"""Does dropping patches inside the ViT really speed it up as much as the FLOPs say? Measured against predicted.

    python benchmarks/bench_vit_pruning_speedup.py                      # 224 px, layers 3 6 9, keeps 0.25 0.1
    python benchmarks/bench_vit_pruning_speedup.py --layers 6 --keeps 0.1 --repeats 6

For each block l and kept share, DINOv2-S runs on the same batch of MNIST test digits (224 px: 256 patches + [CLS])
unreduced and reduced after block l (:func:`salience.vision_tasks.paired_latency`: every configuration in every
repeat, interleaved in a rotated order, the fastest of ``--inner`` runs by process time). The whole pass is timed:
prefix (blocks 1..l), scoring, reduction and suffix. Methods:

  cls             drop by [CLS] attention, the row read from the fused scored-attention kernel (the harness's
                  default for a scorer that reads only the [CLS] row)
  cls_full_matrix the same ranking from the eager K x K probabilities of block l (what the harness did before)
  tome            ToMe's bipartite merging (no attention read)

Columns: method, layer, keep, predicted_speedup (unreduced FLOPs / reduced FLOPs, :func:`estimate_flops`),
measured_speedup (median over repeats of the paired ratio unreduced / reduced process time), measured_low /
measured_high (smallest and largest paired ratio), share_of_predicted (measured / predicted), repeats, batch,
image_size, model, device, threads, torch, cores, load_avg_1m. CSV: benchmarks/results/vit_pruning_speedup_<device>.csv.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from bench_scored_attention import RESULTS, environment, print_table, write_csv

from salience.models import load_model
from salience.scorers.cls_attention import ClsAttention
from salience.vision_tasks import Reduction, digit_pixels, paired_latency


@dataclass
class ClsAttentionFromFullMatrix(ClsAttention):
    """[CLS] attention read from the full eager matrix of block l: the cost the fused row removes."""

    attention_rows = "all"


def speedup_rows(lat, layer: int) -> list[dict]:
    """One row per reduced configuration of one :func:`paired_latency` table."""
    wide = lat.pivot(index="repeat", columns="config", values="cpu_seconds")
    flops = lat.groupby("config").flops.first()
    rows = []
    for config in [c for c in wide.columns if c != "unreduced"]:
        method, keep = config.rsplit("@", 1)
        ratio = wide["unreduced"] / wide[config]
        predicted = flops["unreduced"] / flops[config]
        rows.append(dict(method=method, layer=layer, keep=float(keep), predicted_speedup=round(predicted, 3),
                         measured_speedup=round(float(ratio.median()), 3), measured_low=round(float(ratio.min()), 3),
                         measured_high=round(float(ratio.max()), 3),
                         share_of_predicted=round(float(ratio.median()) / predicted, 3), repeats=len(ratio)))
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default="dinov2-s")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 6, 9])
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.25, 0.1])
    parser.add_argument("--methods", nargs="+", default=["cls", "cls_full_matrix", "tome"],
                        choices=["cls", "cls_full_matrix", "tome"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--inner", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default 1)")
    parser.add_argument("--out", type=Path, default=None, help="CSV path (default benchmarks/results/...)")
    args = parser.parse_args(argv)

    model = load_model(args.model, device=args.device).model
    pixels, _ = digit_pixels("mnist", "test", n=args.batch, size=args.image_size, seed=0)
    pixels = pixels[:args.batch].to(args.device)
    scorers = {"cls": ClsAttention(), "cls_full_matrix": ClsAttentionFromFullMatrix(), "tome": None}
    rows = []
    for layer in args.layers:
        reductions = {f"{m}@{keep}": Reduction(scorers[m], keep, "tome" if m == "tome" else "drop")
                      for keep in args.keeps for m in args.methods}  # fmt: skip
        with torch.inference_mode():
            lat = paired_latency(model, pixels, reductions, layer, repeats=args.repeats, inner=args.inner,
                                 threads=args.threads if args.device == "cpu" else None)
        info = environment(args.threads if args.device == "cpu" else None)
        rows += [dict(r, batch=args.batch, image_size=args.image_size, model=args.model, device=args.device, **info)
                 for r in speedup_rows(lat, layer)]  # fmt: skip
        print(f"  layer {layer}: done", flush=True)
    out = args.out or RESULTS / f"vit_pruning_speedup_{args.device}.csv"
    columns = list(rows[0])
    write_csv(rows, columns, out)
    print_table(rows, columns[:10])
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
