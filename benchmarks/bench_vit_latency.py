#!/usr/bin/env python
"""Paired latency of in-encoder token reduction on the embedded DINOv2-S: the unreduced encoder, ToMe and
[CLS]-ranked dropping after block l, on the same batch of MNIST test digits in every repeat.

    python benchmarks/bench_vit_latency.py --device cpu --threads 1    # the settings of params/vit-merging.yaml

Each repeat runs every configuration ``timing_inner`` times, interleaved in an order rotated from repeat to repeat,
and the fastest run (least process time) counts (``salience.vision_tasks.paired_latency``); the model, image size,
layer, kept share, batch, repeats and inner runs are those of ``params/vit-merging.yaml`` (``--params gpu`` for its
GPU set). Columns: repeat, config, method, keep, seconds (wall), cpu_seconds (process time), flops (estimated, per
image), tokens_last_layer, then what it was measured with: model, image_size, layer, batch, repeats, timing_inner,
device, threads, torch, cores, load_avg_1m, machine (vit-merging checks every setting against its parameters). CSV:
benchmarks/results/vit_latency_<device>.csv, which vit-merging judges its speed part on (``rerun_latency: true``
measures inside the run instead).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from bench_scored_attention import RESULTS, environment, print_table, write_csv

from salience.experiments import vit_merging
from salience.models import load_model
from salience.params import load_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=vit_merging.LATENCY_THREADS,
                        help="torch threads on CPU (default 1: process time is the work itself on a shared machine)")
    parser.add_argument("--params", default="default", help="parameter set of vit-merging (default or gpu)")
    parser.add_argument("--out", type=Path, default=None, help="CSV path (default benchmarks/results/...)")
    args = parser.parse_args()

    params = load_params("vit-merging", args.params, {"device": args.device})
    model = load_model(params.model, device=params.device).model
    lat = vit_merging.measure_latency(model, params, threads=args.threads)
    info = environment(args.threads if args.device == "cpu" else None)
    lat = lat.assign(model=params.model, image_size=params.image_size, layer=params.in_encoder_layer,
                     batch=params.latency_batch, repeats=params.repeats, timing_inner=params.timing_inner,
                     device=args.device, **info)
    out = args.out or RESULTS / f"vit_latency_{args.device}.csv"
    write_csv(lat.to_dict("records"), list(lat.columns), out)
    summary = vit_merging.speedup_summary(vit_merging.speedups(lat))
    print_table(summary.to_dict("records"), list(summary.columns))
    print(f"wrote {out} (torch {torch.__version__})")


if __name__ == "__main__":
    main()
