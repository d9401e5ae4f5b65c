"""Speed, memory, FLOP/s, cost and held-out loss: ComfyUI's native LoRA trainer vs LoRA Lab's.

``python bench/run_bench.py [--quick]`` (``make bench``) runs every measurement, each training run
in its own fresh subprocess, and writes bench/results.md and bench/results.json. The subprocesses
are this script again: ``run_bench.py prepare`` (encodes the images once per size),
``run_bench.py worker --side native --steps 8 ...`` (one training run) and ``run_bench.py peak``
(matmul peak), each printing one JSON line (see worker.py). The plan of runs is in driver.py, the tables in report.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:
        from worker import add_worker_args, run_worker
        parser = argparse.ArgumentParser(prog="run_bench.py worker")
        add_worker_args(parser)
        return run_worker(parser.parse_args(argv[1:]))
    if argv[:1] == ["peak"]:
        from worker import run_peak
        parser = argparse.ArgumentParser(prog="run_bench.py peak")
        parser.add_argument("--dtype", action="append", choices=("fp32", "bf16"))
        return run_peak(parser.parse_args(argv[1:]).dtype or ["fp32", "bf16"])
    if argv[:1] == ["prepare"]:
        from worker import run_prepare
        parser = argparse.ArgumentParser(prog="run_bench.py prepare")
        parser.add_argument("--size", type=int, default=256)
        parser.add_argument("--out", required=True)
        args = parser.parse_args(argv[1:])
        return run_prepare(args.size, args.out)
    from driver import run_driver
    return run_driver(argv)


if __name__ == "__main__":
    sys.exit(main())
