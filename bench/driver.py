"""The benchmark driver: runs every measurement in fresh subprocesses and writes the results.

Order of work (each bullet a series of subprocesses of run_bench.py):
  * prepare: encode the 8 motif images and captions once per resolution (CLIP and VAE then stay out
    of the measured processes);
  * peak: best fp32 and bf16 torch.mm FLOP/s on this machine;
  * fp32 A/B: native, ours, ours with native's layer set, alternating, ``rounds`` times; the first
    round also evaluates held-out loss and counts the FLOPs of one step;
  * defaults: each side at its own default dtypes, with FLOPs (one short round where bf16 is
    emulated, three where the CPU has bf16 instructions);
  * cost: ours over batch / resolution / rank around the base point, bypass and wrapper modes;
  * depth: ours at each checkpoint_depth and with checkpointing off, in rotated rounds;
  * layers: ours on each target_layers preset, with held-out loss after the fp32 runs' steps.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import report

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "run_bench.py"
RESULT_TAG = "BENCH_RESULT "

# Every linear and conv layer plus norm/bias offsets: the set native's TrainLoraNode trains.
NATIVE_LAYER_SET = ["--targets", "all linear+conv", "--norm-bias"]

# The fp32 comparison's arms: (key, label, worker arguments).
ARMS = {
    "native": ("ComfyUI native", ["--side", "native"]),
    "ours": ("LoRA Lab", ["--side", "ours"]),
    # Same trainable set as native: same work.
    "ours_matched": ("LoRA Lab, native's layer set", ["--side", "ours", *NATIVE_LAYER_SET]),
}

# The layer-set section's runs (fp32, with held-out loss): each target_layers preset, and native's set.
LAYER_SETS = {
    "attention": ("attention", ["--targets", "attention"]),
    "attention+feed-forward": ("attention + feed-forward (default)", ["--targets", "attention+feed-forward"]),
    "all linear": ("all linear", ["--targets", "all linear"]),
    "all linear+conv": ("all linear + conv", ["--targets", "all linear+conv"]),
    "native": ("all linear + conv + norm/bias offsets (native's layer set)", NATIVE_LAYER_SET),
}
# Layer sets that an fp32 arm already trains, with --eval, in its first round: the same seeded run.
LAYER_SET_ARMS = {"attention+feed-forward": "ours", "native": "ours_matched"}


@dataclass
class Plan:
    rounds: int = 5
    steps: int = 8  # fp32 A/B runs; held-out loss is taken after these
    arms: tuple = ("native", "ours", "ours_matched")
    default_rounds: int = 1
    default_steps: int = 3  # bf16 where it is emulated (no bf16 instructions) takes minutes a step
    # Where the CPU has bf16 instructions, native's bf16 default takes seconds a step: enough time
    # for as many rounds as the fp32 comparison's drift calls for.
    default_rounds_bf16_cpu: int = 3
    default_steps_bf16_cpu: int = 5
    cost_steps: int = 3
    cost_modes: tuple = ("bypass", "wrapper")
    cost_cells: list = field(default_factory=lambda: [
        ("base", {}), ("batch", {"batch": 2}), ("batch", {"batch": 4}), ("resolution", {"size": 128}),
        ("resolution", {"size": 384}), ("rank", {"rank": 4}), ("rank", {"rank": 16}), ("rank", {"rank": 64})])
    base: dict = field(default_factory=lambda: {"batch": 1, "size": 256, "rank": 8})
    depth_steps: int = 5
    depth_rounds: int = 3
    depths: tuple = (0, 1, 2, 3, 4, 5)  # 0 = checkpointing off
    layer_sets: tuple = tuple(LAYER_SETS)  # one run each, as many steps as the fp32 runs


def quick_plan() -> Plan:
    return Plan(rounds=1, steps=2, arms=("native", "ours"), default_steps=2, cost_steps=2,
                cost_cells=[("base", {}), ("resolution", {"size": 128})], depth_steps=2, depth_rounds=1, depths=(0, 1),
                layer_sets=("attention", "native"))


class WorkerError(RuntimeError):
    pass


class Runner:
    """Starts subprocesses of run_bench.py, keeps their logs, parses their JSON line."""

    def __init__(self, workdir: Path, python: str = sys.executable):
        self.workdir = workdir
        self.python = python
        self.count = 0

    def __call__(self, *args: str, label: str = "") -> dict:
        self.count += 1
        log = self.workdir / f"{self.count:02d}.log"
        cmd = [self.python, str(SCRIPT), *map(str, args)]
        print(f"[bench] {label or ' '.join(args)} ...", end=" ", flush=True)
        start = time.perf_counter()
        with open(log, "w") as err:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=HERE.parent)
        lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT_TAG)]
        if proc.returncode != 0 or not lines:
            tail = log.read_text(errors="replace")[-4000:]
            raise WorkerError(f"{' '.join(cmd)} failed (exit {proc.returncode}); log tail:\n{tail}")
        result = json.loads(lines[-1][len(RESULT_TAG):])
        result["wall_s"] = time.perf_counter() - start
        note = f" {result['median_s_per_step']:.2f} s/step" if "median_s_per_step" in result else ""
        print(f"done in {result['wall_s']:.0f}s{note}", flush=True)
        return result


def worker_args(plan: Plan, encoded: dict, steps: int, extra: list[str], size: int | None = None,
                batch: int | None = None, rank: int | None = None) -> list[str]:
    size = size or plan.base["size"]
    return ["worker", "--steps", steps, "--size", size, "--batch", batch or plan.base["batch"],
            "--rank", rank or plan.base["rank"], "--encoded", encoded[size], *extra]


def run_fp32(run: Runner, plan: Plan, encoded: dict) -> dict[str, list[dict]]:
    out = {arm: [] for arm in plan.arms}
    for r in range(plan.rounds):
        for arm in plan.arms:
            label, extra = ARMS[arm]
            first = ["--eval", "--flops"] if r == 0 else []
            out[arm].append(run(*worker_args(plan, encoded, plan.steps, extra + ["--dtype", "fp32"] + first),
                                label=f"fp32 round {r + 1}: {label}"))
    return out


def run_defaults(run: Runner, plan: Plan, encoded: dict) -> dict[str, list[dict]]:
    out = {"native": [], "ours": []}
    for r in range(plan.default_rounds):
        for side in out:
            first = ["--flops"] if r == 0 else []
            out[side].append(run(*worker_args(plan, encoded, plan.default_steps,
                                              ["--side", side, "--dtype", "default"] + first),
                                 label=f"defaults round {r + 1}: {ARMS[side][0]}"))
    return out


def run_cost(run: Runner, plan: Plan, encoded: dict) -> list[dict]:
    rows = []
    for mode in plan.cost_modes:
        for factor, change in plan.cost_cells:
            extra = ["--side", "ours", "--dtype", "fp32"] + (["--wrapper"] if mode == "wrapper" else [])
            result = run(*worker_args(plan, encoded, plan.cost_steps, extra, **change),
                         label=f"cost {mode} {factor} {change or ''}")
            rows.append({"mode": mode, "factor": factor, **{**plan.base, **change}, "result": result})
    return rows


def run_depth(run: Runner, plan: Plan, encoded: dict) -> list[dict]:
    """Ours at each checkpoint_depth (and with checkpointing off): the memory/speed trade-off, in
    ``depth_rounds`` rounds that go through every depth in turn (this VM's speed drifts for minutes
    at a time, so the report compares each depth with the run without checkpointing of the same
    round). Each round starts one depth further along, so no depth always runs first or last."""
    runs = {depth: [] for depth in plan.depths}
    for r in range(plan.depth_rounds):
        shift = r % len(plan.depths)
        for depth in plan.depths[shift:] + plan.depths[:shift]:
            extra = ["--side", "ours", "--dtype", "fp32"] + (["--no-checkpointing"] if depth == 0 else ["--depth", depth])
            runs[depth].append(run(*worker_args(plan, encoded, plan.depth_steps, extra),
                                   label=f"checkpoint depth {depth or 'off'} (round {r + 1})"))
    return [{"depth": depth, "results": results} for depth, results in runs.items()]


def run_layers(run: Runner, plan: Plan, encoded: dict, fp32: dict[str, list[dict]]) -> list[dict]:
    """Ours on each layer set, with the held-out loss after as many steps as the fp32 runs took: how
    much of native's loss per step each preset reaches, and at what cost per step. A set that an
    fp32 arm trains takes that arm's first-round run (same seed and steps) instead of a new one."""
    rows = []
    for key in plan.layer_sets:
        label, extra = LAYER_SETS[key]
        same_run = fp32.get(LAYER_SET_ARMS.get(key))
        result = same_run[0] if same_run else run(
            *worker_args(plan, encoded, plan.steps, ["--side", "ours", "--dtype", "fp32", "--eval", *extra]),
            label=f"layer set: {label}")
        rows.append({"key": key, "label": label, "result": result})
    return rows


def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            text = f.read()
        names = [l.split(":", 1)[1].strip() for l in text.splitlines() if l.startswith("model name")]
        cpu = names[0] if names else cpu
        flags = next((l for l in text.splitlines() if l.startswith("flags")), "")
        bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in flags.split()]
    except OSError:
        bf16 = []
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__, torch.get_num_threads())"],
                         capture_output=True, text=True)
    version, threads = (out.stdout.split() + ["?", "?"])[:2]
    return {"cpu": cpu, "cores": os.cpu_count(), "bf16_flags": bf16, "torch": version, "torch_threads": threads,
            "python": platform.python_version(), "platform": platform.platform()}


def run_driver(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="run_bench.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny version of everything (end-to-end check)")
    parser.add_argument("--rounds", type=int, help="fp32 A/B rounds")
    parser.add_argument("--steps", type=int, help="steps of each fp32 A/B run (the first is warm-up)")
    parser.add_argument("--skip", action="append", default=[], choices=("defaults", "cost", "depth", "layers"),
                        help="leave a part out")
    parser.add_argument("--out", default=str(HERE), help="folder for results.md / results.json")
    parser.add_argument("--keep-logs", action="store_true", help="keep the workers' logs (their folder is printed)")
    args = parser.parse_args(argv)
    plan = quick_plan() if args.quick else Plan()
    plan.rounds = args.rounds or plan.rounds
    plan.steps = args.steps or plan.steps

    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="loralab-bench-"))
    run = Runner(workdir)
    try:
        info = machine_info()
        print(f"[bench] {info['cpu']}, {info['cores']} cores, torch {info['torch']}; logs in {workdir}", flush=True)
        if info["bf16_flags"] and not args.quick:
            plan.default_rounds, plan.default_steps = plan.default_rounds_bf16_cpu, plan.default_steps_bf16_cpu
        sizes = sorted({plan.base["size"]} | {c.get("size", plan.base["size"]) for _, c in plan.cost_cells})
        encoded = {}
        for size in sizes:
            encoded[size] = str(workdir / f"encoded_{size}.pt")
            run("prepare", "--size", size, "--out", encoded[size], label=f"encode data at {size} px")
        peak = run("peak", label="matmul peak (fp32, bf16)")
        fp32 = run_fp32(run, plan, encoded)
        defaults = run_defaults(run, plan, encoded) if "defaults" not in args.skip else {}
        cost = run_cost(run, plan, encoded) if "cost" not in args.skip else []
        depth = run_depth(run, plan, encoded) if "depth" not in args.skip else []
        layers = run_layers(run, plan, encoded, fp32) if "layers" not in args.skip else []
    except WorkerError as e:
        print(f"\n[bench] {e}", file=sys.stderr)
        print(f"[bench] logs kept in {workdir}", file=sys.stderr)
        return 1
    total = time.perf_counter() - started
    results = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "quick": args.quick,
               "machine": info, "plan": asdict(plan), "peak": peak, "fp32": fp32, "defaults": defaults,
               "cost": cost, "depth": depth, "layers": layers, "total_wall_s": total}
    summary = report.summarize(results)
    results["summary"] = summary
    text = report.markdown(results, summary)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(text)
    print()
    print(text)
    print(f"[bench] wrote {out / 'results.md'} and {out / 'results.json'} in {total / 60:.1f} min")
    if not args.keep_logs:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0

