"""Turns the workers' raw results into summary figures and the markdown of bench/results.md."""
from __future__ import annotations

import statistics

ARM_LABELS = {
    "native": "ComfyUI native",
    "ours": "LoRA Lab",
    "ours_matched": "LoRA Lab, native's layer set",
}


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _pooled_steps(runs: list[dict]) -> list[float]:
    """Step times of all runs of one arm, each run's first (warm-up) step left out."""
    return [t for r in runs for t in (r["step_seconds"][1:] or r["step_seconds"])]


def _peak_for(dtype: str, peak: dict) -> tuple[float | None, str]:
    key = "bf16" if "bf16" in dtype or "bfloat16" in dtype else "fp32"
    entry = peak.get(key) or {}
    return entry.get("flops_per_s"), key


def summarize_arm(runs: list[dict], peak: dict) -> dict:
    steps = _pooled_steps(runs)
    s_per_step = _median(steps)
    flops = next((r["flops_per_step"] for r in runs if "flops_per_step" in r), None)
    evals = next((r["eval"] for r in runs if "eval" in r), None)
    first = runs[0]
    achieved = flops / s_per_step if flops and s_per_step else None
    peak_rate, peak_key = _peak_for(first["training_dtype"], peak)
    return {
        "s_per_step": s_per_step, "measured_steps": len(steps), "runs": len(runs),
        "run_medians": [r["median_s_per_step"] for r in runs],
        "train_mem_mib": _median([r["train_mem_mib"] for r in runs]),
        "train_mem_runs": [r["train_mem_mib"] for r in runs],
        "process_peak_mib": _median([r["process_peak_mib"] for r in runs]),
        "baseline_rss_mib": _median([r["baseline_rss_mib"] for r in runs]),
        "mem_method": first["mem_method"],
        "training_dtype": first["training_dtype"], "lora_dtype": first["lora_dtype"],
        "trainable_params": first["trainable_params"], "adapted_layers": first["adapted_layers"],
        "norm_bias_offsets": first.get("norm_bias_offsets", 0),
        "flops_per_step": flops, "achieved_flops_per_s": achieved,
        "peak_dtype": peak_key, "fraction_of_peak": achieved / peak_rate if achieved and peak_rate else None,
        "eval": evals, "steps_per_run": first["settings"]["steps"],
        "loadavg": [r.get("loadavg_start") for r in runs],
        "kernels": [r["kernels"] for r in runs if r.get("kernels")],
    }


def _with_speedups(arms: dict) -> dict:
    """Each arm's speed against native's: pooled medians, and run by run within each round."""
    native = arms.get("native", {}).get("s_per_step")
    native_rounds = arms.get("native", {}).get("run_medians", [])
    for s in arms.values():
        s["speedup_vs_native"] = native / s["s_per_step"] if native and s["s_per_step"] else None
        # Same-round ratios: the runs of one round ran within a minute or two of each other.
        s["round_speedups"] = [n / m for n, m in zip(native_rounds, s["run_medians"]) if m]
    return arms


def summarize(results: dict) -> dict:
    peak = results["peak"]
    fp32 = _with_speedups({arm: summarize_arm(runs, peak) for arm, runs in results["fp32"].items()})
    defaults = _with_speedups({side: summarize_arm(runs, peak)
                               for side, runs in results.get("defaults", {}).items() if runs})
    cost = []
    for row in results.get("cost", []):
        r = row["result"]
        cost.append({k: row[k] for k in ("mode", "factor", "batch", "size", "rank")} |
                    {"s_per_step": r["median_s_per_step"], "s_per_image": r["median_s_per_step"] / row["batch"],
                     "train_mem_mib": r["train_mem_mib"], "process_peak_mib": r["process_peak_mib"],
                     "trainable_params": r["trainable_params"]})
    return {"fp32": fp32, "defaults": defaults, "cost": cost, "depth": summarize_depth(results.get("depth", [])),
            "layers": summarize_layers(results.get("layers", []))}


def summarize_layers(rows: list[dict]) -> list[dict]:
    """Each layer set's one run: what trains, its s/step and memory, and its held-out loss."""
    return [{"key": row["key"], "label": row["label"], "s_per_step": row["result"]["median_s_per_step"],
             "train_mem_mib": row["result"]["train_mem_mib"], "eval": row["result"].get("eval"),
             **{k: row["result"].get(k, 0) for k in ("trainable_params", "adapted_layers", "norm_bias_offsets")}}
            for row in rows]


def summarize_depth(rows: list[dict]) -> list[dict]:
    """Each depth's pooled s/step and memory, and its time against checkpointing off run by run:
    run i of every depth belongs to round i, so the ratio to off's run i compares runs made a minute
    or two apart, and its median over rounds is the figure least moved by the VM's drift."""
    runs_by_depth = {row["depth"]: row.get("results") or [row["result"]] for row in rows}  # older: one run
    off_medians = [r["median_s_per_step"] for r in runs_by_depth.get(0, [])]
    depth = []
    for d, runs in runs_by_depth.items():
        round_ratios = [r["median_s_per_step"] / o for r, o in zip(runs, off_medians) if o]
        depth.append({"depth": d, "s_per_step": _median(_pooled_steps(runs)),
                      "round_time_vs_off": round_ratios,
                      "time_vs_off": _median(round_ratios) if round_ratios else None,
                      "train_mem_mib": _median([r["train_mem_mib"] for r in runs]),
                      "process_peak_mib": _median([r["process_peak_mib"] for r in runs]),
                      "checkpointing": runs[0].get("checkpointing", "")})
    return depth


# --- markdown -------------------------------------------------------------------------------------

def _f(value, fmt="{:.2f}", none="–"):
    return none if value is None else fmt.format(value)


def _gflops(value):
    return _f(value, "{:.1f}") if value is None else f"{value / 1e9:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _speed_table(arms: dict) -> list[str]:
    rows = []
    for arm, s in arms.items():
        runs = ", ".join(f"{m:.2f}" for m in s["run_medians"])
        rounds = ", ".join(f"{r:.2f}x" for r in s.get("round_speedups", [])) or "–"
        rows.append([ARM_LABELS.get(arm, arm), f"{s['training_dtype']} / {s['lora_dtype']}", _f(s["s_per_step"]),
                     f"{runs}", _f(s["speedup_vs_native"], "{:.2f}x"), rounds, _f(s["train_mem_mib"], "{:.0f} MiB"),
                     _f(s["process_peak_mib"], "{:.0f} MiB"),
                     f"{s['trainable_params']:,} ({s['adapted_layers']} layers + {s['norm_bias_offsets']} offsets)"])
    return _table(["trainer", "train / adapter dtype", "s/step (median)", "per-run medians", "speed vs native",
                   "same-round speed vs native", "training memory", "process peak RSS", "trainable parameters"], rows)


def _kernel_lines(arms: dict) -> list[str]:
    """How often LoRA Lab's per-process kernel probes picked oneDNN matmuls and Winograd 3x3 convs."""
    runs = [k for arm in arms.values() for k in arm.get("kernels", [])]
    if not runs:
        return []
    onednn = sum(k["onednn_matmul"] for k in runs)
    lines = ["", f"LoRA Lab's kernel probes (`loralab.adapters.cpu_kernels`, once per process): fp32 matmuls on "
                 f"oneDNN in {onednn} of {len(runs)} runs (torch's default in the others)."]
    geometries = sorted({g for k in runs for g in k["winograd_3x3"]})
    if geometries:
        lines += ["", "Frozen 3x3 convs by Winograd (`loralab.sampler.winograd`, probed once per geometry per process):",
                  ""]
        lines += [f"- {g}: in {sum(k['winograd_3x3'].get(g, False) for k in runs)} of "
                  f"{sum(g in k['winograd_3x3'] for k in runs)} runs" for g in geometries]
    return lines


def _flops_table(arms: dict, peak: dict) -> list[str]:
    rows = []
    for arm, s in arms.items():
        entry = peak.get(s["peak_dtype"]) or {}
        rows.append([ARM_LABELS.get(arm, arm), _gflops(s["flops_per_step"]), _f(s["s_per_step"]),
                     _gflops(s["achieved_flops_per_s"]), s["peak_dtype"], _gflops(entry.get("flops_per_s")),
                     entry.get("kernel", "torch.mm"), _f(s["fraction_of_peak"], "{:.1%}")])
    return _table(["trainer", "GFLOP/step (counted)", "s/step", "achieved GFLOP/s", "peak dtype",
                   "matmul peak GFLOP/s", "peak kernel", "of peak"], rows)


def _eval_table(arms: dict) -> list[str]:
    rows = []
    for arm, s in arms.items():
        e = s.get("eval")
        if not e:
            continue
        change = (e["trained"] - e["base"]) / e["base"] if e["base"] else None
        rows.append([ARM_LABELS.get(arm, arm), str(s["steps_per_run"]), f"{e['base']:.4f}", f"{e['trained']:.4f}",
                     _f(change, "{:+.1%}"), str(e["pairs"])])
    return _table(["trainer", "steps", "held-out loss, base model", "after training", "change", "pairs"], rows)


def _cost_table(cost: list[dict]) -> list[str]:
    modes = list(dict.fromkeys(c["mode"] for c in cost))
    cells = list(dict.fromkeys((c["factor"], c["batch"], c["size"], c["rank"]) for c in cost))
    by = {(c["mode"], c["factor"], c["batch"], c["size"], c["rank"]): c for c in cost}
    header = ["varied", "batch", "px", "rank"]
    for m in modes:
        header += [f"{m} s/step", f"{m} s/image", f"{m} training memory"]
    rows = []
    for cell in cells:
        row = [cell[0], str(cell[1]), str(cell[2]), str(cell[3])]
        for m in modes:
            c = by.get((m, *cell))
            row += [_f(c and c["s_per_step"]), _f(c and c["s_per_image"]), _f(c and c["train_mem_mib"], "{:.0f} MiB")]
        rows.append(row)
    return _table(header, rows)


def _depth_table(depth: list[dict]) -> list[str]:
    off = next((d for d in depth if d["depth"] == 0), None)
    rows = []
    for d in depth:
        rel_mem = d["train_mem_mib"] / off["train_mem_mib"] if off and off["train_mem_mib"] else None
        rounds = ", ".join(f"{r:.2f}x" for r in d.get("round_time_vs_off", [])) or "–"
        rows.append([str(d["depth"] or "off"), _f(d["s_per_step"]), _f(d.get("time_vs_off"), "{:.2f}x"), rounds,
                     _f(d["train_mem_mib"], "{:.0f} MiB"), _f(rel_mem, "{:.2f}x"), _f(d["process_peak_mib"], "{:.0f} MiB"),
                     d.get("checkpointing") or "–"])
    return _table(["checkpoint_depth", "s/step", "time vs off (median of rounds)", "same-round time vs off",
                   "training memory", "memory vs off", "process peak RSS",
                   "pieces recomputed (measured before step 1)"], rows)


def _layers_table(layers: list[dict], native_eval: dict | None) -> list[str]:
    native = native_eval["trained"] if native_eval else None
    rows = []
    for row in layers:
        e = row["eval"]
        trained = e["trained"] if e else None
        rows.append([row["label"], f"{row['adapted_layers']} + {row['norm_bias_offsets']}",
                     f"{row['trainable_params']:,}", _f(row["s_per_step"]), _f(row["train_mem_mib"], "{:.0f} MiB"),
                     _f(trained, "{:.4f}"), _f(trained / native if trained and native else None, "{:.2f}x")])
    return _table(["target_layers", "adapted layers + offsets", "trainable parameters", "s/step (one run)",
                   "training memory", "held-out loss", f"vs native's ({_f(native, '{:.4f}')})"], rows)


# The targets: (label, arm, figure, how it compares, threshold).
TARGETS = [
    ("speed vs native at equal settings (fp32)", "fp32", "speed", ">=", 2.5),
    ("training memory vs native at equal settings", "fp32", "memory", "<=", 0.7),
    ("speed vs native, each node at its own defaults (set for a CPU that emulates bf16)", "defaults", "speed", ">=", 20.0),
    ("held-out loss after equal steps vs native's (lower is better)", "fp32", "eval", "<=", 1.0),
    ("share of the matmul peak (aim)", "fp32", "roofline", ">=", 0.5),
]


def _figure(arms: dict, arm: str, figure: str):
    s, native = arms.get(arm), arms.get("native")
    if not s or not native:
        return None
    if figure == "speed":
        return s.get("speedup_vs_native")
    if figure == "memory":
        return s["train_mem_mib"] / native["train_mem_mib"] if native.get("train_mem_mib") else None
    if figure == "roofline":
        return s.get("fraction_of_peak")
    e, n = s.get("eval"), native.get("eval")
    return e["trained"] / n["trained"] if e and n and n["trained"] else None


def _targets_table(summary: dict) -> list[str]:
    """Each target against each LoRA Lab arm, computed from the measurements above."""
    rows = []
    for label, part, figure, op, threshold in TARGETS:
        arms = summary.get(part) or {}
        for arm in arms:
            if arm == "native":
                continue
            value = _figure(arms, arm, figure)
            if value is None:
                continue
            met = value >= threshold if op == ">=" else value <= threshold
            shown = f"{value:.1%}" if figure == "roofline" else f"{value:.2f}x"
            goal = f"{threshold:.0%}" if figure == "roofline" else f"{threshold:g}x"
            rows.append([label, ARM_LABELS.get(arm, arm), shown, f"{op} {goal}", "met" if met else "**not met**"])
    return _table(["target", "LoRA Lab arm", "measured", "target", ""], rows)


def markdown(results: dict, summary: dict) -> str:
    m, plan, peak = results["machine"], results["plan"], results["peak"]
    fp32 = summary["fp32"]
    base = plan["base"]
    lines = [
        "# LoRA training benchmark: ComfyUI native trainer vs LoRA Lab",
        "",
        f"{results['date']} · {m['cpu']} ({m['cores']} cores, bf16 instructions: {', '.join(m['bf16_flags']) or 'none'})"
        f" · torch {m['torch']} ({m['torch_threads']} threads) · Python {m['python']}"
        f" · `make bench`{' --quick' if results['quick'] else ''} took {results['total_wall_s'] / 60:.1f} min",
        "",
        f"Tiny SD1.5-architecture model (devkit fixture), {base['size']} px, 8 motif images, batch {base['batch']}, "
        f"rank {base['rank']}, alpha 1, AdamW lr 5e-4, MSE, gradient checkpointing on. Every run is a fresh "
        "process; step 1 of each run is warm-up and left out.",
        "",
        f"## Speed and memory, fp32 training and adapter weights ({plan['rounds']} round(s) of "
        f"{' / '.join(ARM_LABELS[a] for a in plan['arms'])}, {plan['steps']} steps each)",
        "",
        *_speed_table(fp32),
        *_kernel_lines(fp32),
        "",
        "## Achieved FLOP/s (fp32)",
        "",
        *_flops_table(fp32, peak),
        "",
        f"## Held-out loss after {plan['steps']} steps (fp32)",
        "",
        *_eval_table(fp32),
    ]
    if summary["defaults"]:
        lines += ["", f"## Each node at its own defaults ({plan['default_rounds']} round(s), {plan['default_steps']} steps each)",
                  "", *_speed_table(summary["defaults"]), "", *_flops_table(summary["defaults"], peak)]
    if summary["cost"]:
        lines += ["", f"## Cost of LoRA Lab (fp32), one factor varied at a time around batch {base['batch']}, "
                      f"{base['size']} px, rank {base['rank']} ({plan['cost_steps']} steps per cell)", "",
                  *_cost_table(summary["cost"])]
    if summary.get("depth"):
        lines += ["", f"## Gradient checkpointing: memory/speed at each checkpoint_depth (LoRA Lab, fp32, bypass, "
                      f"batch {base['batch']}, {base['size']} px, rank {base['rank']}, {plan.get('depth_rounds', 1)} round(s) of "
                      f"{plan['depth_steps']} steps each; s/step and memory are medians over all runs, time vs off "
                      "compares each run with the run without checkpointing of its round)", "",
                  *_depth_table(summary["depth"]), "",
                  "Depth 1 checkpoints whole blocks (fewest stored activations); each deeper level checkpoints "
                  "smaller pieces, so fewer activations are recomputed per piece but more piece boundaries are kept. "
                  "At every depth, single layers and the piece that runs last are left unchecked (recomputing them "
                  "would save no memory), and so are pieces that free under a third of the densest piece's "
                  "activation bytes per FLOP of recompute, measured by one forward before the first step (in this "
                  "UNet, the ResBlocks: little memory for two large convolutions). That forward prices every frozen "
                  "3x3 conv as the direct conv, also where training runs it by Winograd, so the choice does not "
                  "change with the timing probe from one run to the next. Frozen layers keep nothing for "
                  "the backward, so a recompute also stops before the layers that end a piece."]
    if summary.get("layers"):
        native_eval = (fp32.get("native") or {}).get("eval")
        lines += ["", f"## Held-out loss by target_layers (LoRA Lab, fp32, {plan['steps']} steps, one run each)", "",
                  *_layers_table(summary["layers"], native_eval), "",
                  "The held-out loss is the same from run to run for a given setting (seeded data order, noise and "
                  "initialisation); s/step is one run's median, which this VM's drift moves by up to about 15%, so "
                  "the speed figures are the fp32 table's."]
    lines += ["", "## Targets", "", *_targets_table(summary)]
    lines += ["", "## How each figure is measured", "", *NOTES]
    return "\n".join(lines) + "\n"


NOTES = [
    "- **s/step**: native is timed through ComfyUI's progress hook (`comfy.utils.set_progress_bar_global_hook`; "
    "its TrainSampler updates the ProgressBar once per optimizer step, so a step is the gap between two updates); "
    "LoRA Lab through `train_lora(on_step=...)` (`StepReport.seconds`). Step 1 of every run is left out; the figure "
    "is the median over the remaining steps of all runs of that trainer. Speed vs native = native s/step ÷ this s/step "
    "(the figure the targets use); same-round speed vs native = the same ratio of the two runs of each round, which "
    "ran a minute or two apart, so it shows how much this VM's drift moves the figure.",
    "- **training memory**: peak RSS while the trainer runs (its setup included) minus the RSS just before it is "
    "called, with the model loaded and the data encoded. The peak is Linux's VmHWM after resetting it with "
    "`echo 5 > /proc/self/clear_refs` just before training (a 5 ms VmRSS sampling thread where that reset does not "
    "work). **process peak RSS**: the whole process's peak (VmHWM before and after the reset). The images are "
    "VAE/CLIP-encoded once in a separate process, so neither the VAE nor CLIP is in these processes.",
    "- **FLOPs/step**: `torch.utils.flop_counter.FlopCounterMode` around an extra 2-step and an extra 1-step run in "
    "the same process; a step's FLOPs are the difference, so one-time setup work is not counted as step work, "
    "with the pack's formulas for the kernels torch's registry leaves out (the CPU flash-attention kernels and "
    "oneDNN's linear, `loralab.sampler.flop_formulas`). It counts matmuls, convolutions and attention as executed, "
    "so checkpointing's recomputation and a weight "
    "wrapper's per-forward `W + up @ down` are included, and each trainer's FLOPs are its own work. "
    "**achieved FLOP/s** = FLOPs/step ÷ median s/step; **of peak** = that ÷ the best square matmul FLOP/s "
    "(sizes 1024–4096, best of 8, over torch.mm and, on a CPU, oneDNN's linear: the kernels training can use) "
    "measured in the same bench run, in the training dtype. The peak gets a 45 s budget per dtype: where bf16 is "
    "emulated (a CPU without bf16 instructions) only the small sizes fit, so 'of peak' can pass 100% there.",
    "- **kernels**: native runs torch's default kernels (fp32 matmuls on MKL); LoRA Lab runs its frozen layers' "
    "and LoRA's fp32 matmuls on oneDNN where a 0.3 s probe at the start of the process (four layer-sized "
    "products, forward and backward) measures oneDNN at least 5% faster "
    "(`loralab.adapters.cpu_kernels`). Convolutions run on oneDNN for both, except that LoRA Lab runs frozen 3x3 "
    "convs over at least 32x32 positions by Winograd's F(2x2, 3x3) where its own probe measures that faster "
    "(`loralab.sampler.winograd`); its FLOPs are counted as executed (the transforms and 16 matmuls), so they "
    "are fewer than a direct conv's.",
    "- **held-out loss**: `loralab.sampler.evaluation.heldout_loss` on `heldout_pairs` (4 fixed (noise, sigma) "
    "pairs per image, seed 1234) of a `TrainingSet` built from the same latents and positives; prediction-space "
    "MSE, fp32. Native's LORA_MODEL is applied with `comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0)`, "
    "LoRA Lab's through its returned model. Native trains on MSE of the denoised latent, LoRA Lab on MSE in "
    "prediction space (epsilon); the held-out metric is the same for both.",
    "- **layer sets**: native adapts every linear and conv layer and trains an offset for every norm weight and "
    "bias; LoRA Lab's default adapts the transformer blocks' attention and feed-forward layers and their 1x1 "
    "projections only (kohya's LoRA set). The 'native's layer set' row (target_layers 'all linear+conv', "
    "train_norm_bias on) trains the same set as native; the target_layers table trains each preset in turn.",
    "- **defaults**: native's defaults are read from its schema (bf16 training and adapter weights); LoRA Lab's "
    "are training_dtype 'auto' and lora_dtype 'auto' (bf16 compute where the CPU has bf16 instructions, fp32 "
    "adapter weights). 'of peak' there is against the matmul peak of the run's training dtype. Where both "
    "compute in bf16 on fp32-stored weights, native casts each weight again at every use; LoRA Lab holds its "
    "frozen weights as bf16 inside their own storage for the run (`loralab.sampler.bf16_weights`).",
    "- **cost table**: LoRA Lab only, fp32; bypass = adapters as forward hooks, wrapper = weight wrappers that "
    "rebuild W + ΔW on each forward (ComfyUI native's mechanism). s/image = s/step ÷ batch.",
]
