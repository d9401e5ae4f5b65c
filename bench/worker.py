"""One benchmark run in this (fresh) process: load, encode, train one side, measure, print JSON.

Called by run_bench.py as ``run_bench.py worker ...`` and ``run_bench.py peak``; prints exactly one
line starting with RESULT_TAG on stdout (logs go to stderr).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

RESULT_TAG = "BENCH_RESULT "


def add_worker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--side", choices=("native", "ours"), required=True)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--dtype", choices=("fp32", "default"), default="fp32",
                   help="fp32: fp32 training and adapter weights; default: the side's own defaults")
    p.add_argument("--wrapper", action="store_true", help="ours: weight-wrapper mode instead of bypass")
    p.add_argument("--targets", default="", help="ours: target preset (default: the pack's default)")
    p.add_argument("--norm-bias", action="store_true", help="ours: also train norm/bias offsets")
    p.add_argument("--no-checkpointing", action="store_true", help="gradient checkpointing off")
    p.add_argument("--depth", type=int, default=1, help="ours: checkpoint_depth 1-5")
    p.add_argument("--eval", action="store_true", help="held-out loss of the base and the trained model")
    p.add_argument("--flops", action="store_true", help="count the FLOPs of one more 1-step run")
    p.add_argument("--encoded", default=None, help="data encoded by 'run_bench.py prepare' (else encoded here)")


def emit(result: dict) -> None:
    sys.stdout.write(RESULT_TAG + json.dumps(result) + "\n")
    sys.stdout.flush()


def run_worker(args: argparse.Namespace) -> int:
    from memory import PeakWindow
    import workload

    settings = workload.Settings(steps=args.steps, batch_size=args.batch, rank=args.rank, learning_rate=args.lr,
                                 dtype=args.dtype, bypass=not args.wrapper, targets=args.targets,
                                 norm_bias=args.norm_bias, checkpointing=not args.no_checkpointing,
                                 checkpoint_depth=args.depth)
    inputs = workload.load_inputs(size=args.size, encoded=args.encoded)
    gc.collect()
    load_start = os.getloadavg()[0]
    window = PeakWindow().start()
    start = time.perf_counter()
    trained = workload.train(args.side, inputs, settings)
    train_wall = time.perf_counter() - start
    window.stop()

    measured = trained.step_seconds[1:] or trained.step_seconds  # step 1 is the warm-up
    result = {
        "side": args.side, "settings": {k: v for k, v in vars(args).items() if k != "encoded"},
        "loadavg_start": load_start, "load_seconds": inputs.load_seconds, "train_wall_s": train_wall,
        "step_seconds": trained.step_seconds, "median_s_per_step": statistics.median(measured),
        "losses": trained.losses, "training_dtype": trained.training_dtype, "lora_dtype": trained.lora_dtype,
        "trainable_params": trained.trainable_params, "adapted_layers": trained.adapted_layers,
        **{k: v for k, v in trained.extra.items() if k != "lora_sd"}, **window.as_dict(),
    }
    if args.eval:
        patcher = trained.model if args.side == "ours" else workload.native_patcher(inputs, trained.extra["lora_sd"])
        result["eval"] = workload.heldout(inputs, patcher)
        del patcher
    del trained
    gc.collect()
    if args.flops:
        # One step's FLOPs: a 2-step run's minus a 1-step run's, so one-time setup work (LoRA Lab's
        # measuring forward for checkpointing, native's setup) is not counted as step work.
        from flops import FlopCount
        counts = {}
        for steps in (1, 2):
            with FlopCount() as counter:
                workload.train(args.side, inputs, workload.Settings(**{**vars(settings), "steps": steps}))
            counts[steps] = counter
        result["flops_per_step"] = counts[2].total - counts[1].total
        result["flops_setup"] = 2 * counts[1].total - counts[2].total
        one_step = counts[1].by_operator()
        result["flops_by_op"] = {op: n - one_step.get(op, 0) for op, n in counts[2].by_operator().items()}
    result["loadavg_end"] = os.getloadavg()[0]
    emit(result)
    return 0


def run_prepare(size: int, out: str) -> int:
    import workload
    start = time.perf_counter()
    workload.save_encoded(out, size)
    emit({"size": size, "path": out, "seconds": time.perf_counter() - start})
    return 0


def run_peak(dtypes: list[str]) -> int:
    import torch
    from flops import matmul_peak
    emit({name: matmul_peak(getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[name])) for name in dtypes})
    return 0
