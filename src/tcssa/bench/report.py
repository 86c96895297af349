"""The results: targets judged from the rows, the printed table, bench.json, bench.csv, the plot."""

from __future__ import annotations

import csv
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure

from tcssa.bench.config import BenchConfig
from tcssa.runtime import cpu_has_bfloat16


@dataclass
class BenchResult:
    rows: list[dict] = field(default_factory=list)
    targets: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)


def machine_description() -> dict:
    flags, model = set(), platform.processor() or platform.machine()
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        model = next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if "model name" in line)
        flags = set(next(line for line in cpuinfo.splitlines() if line.startswith("flags")).split())
    except (OSError, StopIteration):
        pass
    memory = None
    try:
        memory = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30), 1)
    except (ValueError, OSError):
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": memory,
        "bf16_instructions": sorted(f for f in flags if "bf16" in f or f.startswith("amx")) or "none",
        "bf16_native_in_torch": cpu_has_bfloat16(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def fit_exponent(rows: list[dict]) -> float | None:
    points = [(r["n"], r["time_ms"]) for r in rows if "time_ms" in r]
    if len(points) < 2:
        return None
    n, t = np.log([p[0] for p in points]), np.log([p[1] for p in points])
    return float(np.polyfit(n, t, 1)[0])


def evaluate_targets(result: BenchResult, config: BenchConfig) -> list[dict]:
    """The issue's targets, each with what was measured and whether it is met (None: not measured)."""
    rows = result.rows
    find = lambda section, method: [r for r in rows if r["section"] == section and r["method"] == method]  # noqa: E731
    targets = []

    def add(item: str, target: str, measured: str, met: bool | None) -> None:
        # Quick-size figures are too small and too noisy to judge a target by (a chance-level AUC is
        # "not lower" than another chance-level AUC): they are reported, never given a verdict.
        verdict = None if config.quick else met
        targets.append({"item": item, "target": target, "measured": measured, "met": verdict})

    def ratio(r: dict) -> str:  # wall-clock ratio (judged), and the steadier CPU-time one beside it
        cpu = r.get("cpu_speedup_vs_reference")
        return f"{r['speedup_vs_reference']:.2f}x" + (f" (CPU time {cpu:.2f}x)" if cpu else "")

    ours = {r["n"]: r for r in find("single slide", "tcssa") if "speedup_vs_reference" in r}
    if ours:
        speed = ", ".join(f"N={n:,}: {ratio(r)}" for n, r in ours.items())
        mem = ", ".join(f"{r.get('peak_rss_vs_reference', float('nan')):.3f}" for r in ours.values())
        met = all(
            r["speedup_vs_reference"] >= 1 and r.get("peak_rss_vs_reference", 9) <= 1 for r in ours.values()
        )
        add(
            "1",
            "one slide, float32: never slower, never more peak memory",
            f"{speed}; peak RSS ratio {mem}",
            met,
        )
    batched = find("cohort compression", "cohort-batched")
    if batched:
        r = batched[0]
        add(
            "2",
            f"cohort compression ({r['slides']} slides): >= 1.5x slides/s",
            f"{ratio(r)}; {r['slides_per_s']:.1f} vs "
            f"{find('cohort compression', 'cohort-reference')[0]['slides_per_s']:.1f} slides/s",
            r["speedup_vs_reference"] >= 1.5,
        )
    trained = find("cohort training", "train-batched")
    if trained:
        r = trained[0]
        auc = {x["method"]: x for x in rows if x["section"] == "auc" and x.get("seed") == "mean"}
        auc_text, auc_ok = "AUC not measured", None
        if "train-batched" in auc and "train-reference" in auc:
            a, b = auc["train-batched"], auc["train-reference"]
            se = lambda r: f" +- {r['test_auc_se']:.3f}" if "test_auc_se" in r else ""  # noqa: E731
            auc_text = (
                f"test AUC {a['test_auc']:.3f}{se(a)} (batched) vs {b['test_auc']:.3f}{se(b)} (reference), "
                f"{a['note']}"
            )
            auc_ok = a["test_auc"] >= b["test_auc"]  # judged at equal epochs, the strict reading
            same_time = auc.get("train-batched, same training time")
            if same_time:
                auc_text += (
                    f"; batched trained for the reference's time instead ({same_time['epochs']:.0f} epochs "
                    f"on average): {same_time['test_auc']:.3f}{se(same_time)}"
                )
        add(
            "3",
            "cohort training: >= 3x slides/s, rare-lesion AUC not lower",
            f"{ratio(r)}; {auc_text}",
            (r["speedup_vs_reference"] >= 3) and (auc_ok if auc_ok is not None else True),
        )
    bf16 = {r["n"]: r for r in find("single slide", "tcssa-bf16") if "speedup_vs_reference" in r}
    agree = [r for r in rows if r["method"] == "tcssa-bf16 vs tcssa (float32)"]
    if bf16 and agree:
        n = max(bf16)
        a = agree[0]
        add(
            "4",
            "bfloat16 at the largest N: >= 3x the float32 reference; top-2 agreement >= 99%; "
            "tokens within 1e-2",
            f"N={n:,}: {bf16[n]['speedup_vs_reference']:.2f}x; agreement {100 * a['top2_agreement']:.2f}% "
            f"(N={a['n']:,}); tokens ||dY||/||Y|| {a['token_rel_error']:.2e} "
            f"(worst single slot {a['worst_slot_rel_error']:.2e})",
            bf16[n]["speedup_vs_reference"] >= 3
            and a["top2_agreement"] >= 0.99
            and a["token_rel_error"] <= 1e-2,
        )
    stream = find("streaming", "tcssa-h5")
    if stream:
        largest = max(stream, key=lambda r: r["n"])
        exponent = fit_exponent(stream)
        exact = [r for r in rows if r["method"].startswith("compress_h5 vs")]
        peak = largest.get("peak_rss_mib")
        add(
            "5",
            f"compress_h5 at N={largest['n']:,} (D={config.dim}, float16 file): peak RSS < 1 GiB, "
            "time ~ N^1, exact",
            f"peak RSS {peak:.0f} MiB; time exponent {exponent:.3f} over N={min(r['n'] for r in stream):,}.."
            f"{largest['n']:,}; max |token diff| {exact[0]['token_max_abs_diff']:.1e}"
            if peak is not None and exponent is not None and exact
            else "incomplete",
            None
            if peak is None or not exact
            else peak < 1024 and exact[0]["token_max_abs_diff"] <= 1e-4 and largest["n"] >= 1_000_000,
        )
    floors = [
        r for r in find("single slide", "tcssa") + find("single slide", "reference") if "floor_fraction" in r
    ]
    if floors:
        text = "; ".join(f"{r['method']} N={r['n']:,}: {r['floor_fraction']:.2f}" for r in floors)
        add(
            "6",
            "time per patch against the floor (gate product + one read of the expert weights)",
            text,
            None,
        )
    alternatives = []
    for m in ("abmil", "transmil", "dense-attention"):
        ran = [r["n"] for r in find("single slide", m) if "time_ms" in r]
        failed = [r["n"] for r in find("single slide", m) if r.get("status", "ok") != "ok"]
        if ran or failed:
            alternatives.append(
                f"{m}: ran to N={max(ran):,}" + (f", stopped at N={min(failed):,}" if failed else "")
                if ran
                else f"{m}: stopped at N={min(failed):,}"
            )
    if alternatives:
        add("7", "alternatives in the same table: where O(N^2) stops", "; ".join(alternatives), None)
    _issue17_targets(find, rows, add, ratio)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    add(
        "8",
        "the same table on a GPU",
        f"not run (GPU present: {gpu})" if gpu else "no GPU on this machine",
        None,
    )
    return targets


def _issue17_targets(find, rows, add, ratio) -> None:
    """Issue 17's targets (items 9-12): the unpadded batch path, mixed bfloat16, torch.compile."""
    packed = find("cohort compression", "cohort-packed")
    if packed:
        r = packed[0]
        add(
            "9",
            f"a list of {r['slides']} slides to tokens through the training-capable path "
            "(forward_slides): >= 1.5x slides/s",
            f"{ratio(r)} the reference; {r['speedup_vs_one_by_one']:.2f}x tcssa's forward slide by slide",
            r["speedup_vs_reference"] >= 1.5,
        )
    trained = find("cohort training", "train-packed")
    if trained:
        r = trained[0]
        padded = find("cohort training", "train-batched")
        add(
            "10",
            "training steps on lists of slides (no padding): >= 3x slides/s",
            f"{ratio(r)}" + (f"; the padded, masked steps {ratio(padded[0])}" if padded else ""),
            r["speedup_vs_reference"] >= 3,
        )
    mixed = [r for r in rows if r["method"].startswith("tcssa-bf16-") and r["method"].endswith("(float32)")]
    if mixed:
        parts, met = [], True
        native = cpu_has_bfloat16()
        for a in mixed:
            name = a["method"].split(" ")[0]
            speeds = {r["n"]: r for r in find("single slide", name) if "speedup_vs_reference" in r}
            speed = speeds[max(speeds)]["speedup_vs_reference"] if speeds else None
            parts.append(
                f"{name}: "
                + (f"N={max(speeds):,}: {speed:.2f}x; " if speed is not None else "")
                + f"agreement {100 * a['top2_agreement']:.2f}%, tokens {a['token_rel_error']:.2e}"
            )
            met = met and a["top2_agreement"] >= 0.995 and a["token_rel_error"] <= 1e-2
            met = met and speed is not None and speed >= 3
        note = "" if native else " (this CPU has no bfloat16 instructions: torch emulates them)"
        add(
            "11",
            "mixed bfloat16 at the largest N: >= 3x the float32 reference; top-2 agreement >= 99.5%; "
            "tokens within 1e-2",
            "; ".join(parts) + note,
            met,
        )
    compiled = {r["n"]: r for r in find("single slide", "tcssa-compiled") if "time_ms" in r}
    if compiled:
        eager = {r["n"]: r for r in find("single slide", "tcssa") if "time_ms" in r}
        text = ", ".join(
            f"N={n:,}: {eager[n]['time_ms'] / r['time_ms']:.2f}x eager"
            for n, r in compiled.items()
            if n in eager
        )
        add("12", "torch.compile of the compressor: measured, kept only if it pays", text, None)


COLUMNS = [
    "section",
    "method",
    "n",
    "time_ms",
    "cpu_ms",
    "us_per_patch",
    "speedup_vs_reference",
    "cpu_speedup_vs_reference",
    "speedup_vs_one_by_one",
    "peak_rss_mib",
    "work_mib",
    "peak_rss_vs_reference",
    "floor_ms",
    "floor_fraction",
    "slides",
    "slides_per_s",
    "probe_s",
    "batch_size",
    "chunk_size",
    "top2_agreement",
    "token_rel_error",
    "worst_slot_rel_error",
    "token_max_abs_diff",
    "seed",
    "epochs",
    "test_auc",
    "test_auc_se",
    "status",
    "note",
]


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 0.01:
            return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
        return f"{value:.1e}"
    return str(value)


def _section_cells(rows: list[dict]) -> tuple[list[str], list[list[str]], list[str]]:
    """(columns that the section fills, formatted cells, its notes)."""
    columns = [c for c in COLUMNS[1:] if any(c in r for r in rows) and c != "note"]
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    return columns, cells, sorted({r["note"] for r in rows if r.get("note")})


def _target_lines(result: BenchResult) -> list[str]:
    quick = bool(result.meta.get("config", {}).get("quick"))
    marks = {True: "MET", False: "NOT MET", None: "figure only, quick size" if quick else "report"}
    return [f"{t['item']}. [{marks[t['met']]}] {t['target']}: {t['measured']}" for t in result.targets]


def format_bench_table(result: BenchResult, markdown: bool = False) -> str:
    """The rows as tables, one per section, with only the columns that section fills; plain
    text aligned for a terminal, or markdown (``bench.md``)."""
    lines = []
    for section in dict.fromkeys(r["section"] for r in result.rows):
        columns, cells, notes = _section_cells([r for r in result.rows if r["section"] == section])
        if markdown:
            lines += ["", f"### {section}", "", "| " + " | ".join(columns) + " |"]
            lines += ["|" + "---|" * len(columns)] + ["| " + " | ".join(row) + " |" for row in cells]
            lines += [""] * bool(notes) + [f"- {note}" for note in notes]
            continue
        widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
        lines += ["", f"## {section}", "  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
        lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
        lines += [f"  note: {note}" for note in notes]
    if result.targets:
        lines += ["", "### targets", ""] if markdown else ["", "## targets"]
        lines += _target_lines(result)  # "1. [MET] ...": a numbered list in markdown too
    return "\n".join(lines).lstrip("\n")


def write_outputs(result: BenchResult, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "bench.json",
        "csv": out_dir / "bench.csv",
        "markdown": out_dir / "bench.md",
        "plot": out_dir / "bench_scaling.png",
    }
    payload = {"meta": result.meta, "targets": result.targets, "rows": result.rows}
    paths["json"].write_text(json.dumps(payload, indent=2, default=str) + "\n")
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(result.rows)
    paths["markdown"].write_text(format_bench_table(result, markdown=True) + "\n")
    plot_scaling(result, paths["plot"])
    return paths


def plot_scaling(result: BenchResult, path: Path) -> None:
    """Time and peak memory against N, log-log, one line per method (same colour in both panels);
    an x marks the size at which a method ran out of memory."""
    rows = [r for r in result.rows if r["section"] in ("single slide", "streaming")]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colours = {m: colormaps["tab20"](i % 20) for i, m in enumerate(methods)}
    fig = Figure(figsize=(13, 5))  # no pyplot: nothing global, no GUI backend (as tcssa.viz)
    axes = fig.subplots(1, 2)
    panels = (("time_ms", "time per slide (ms, median)"), ("peak_rss_mib", "peak RSS of the process (MiB)"))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for m in methods:
            points = sorted((r["n"], r[key]) for r in rows if r["method"] == m and key in r)
            style = "--" if m.startswith(("gate-product", "expert-read")) else "-"
            if points:
                ax.plot(*zip(*points, strict=True), style, marker="o", color=colours[m], label=m)
            failed = [
                r["n"] for r in rows if r["method"] == m and r.get("status", "").startswith("out of memory")
            ]
            if failed and points:
                ax.plot(failed, [points[-1][1]] * len(failed), "x", color=colours[m], markersize=10, mew=2)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("patches per slide N")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    extra = [
        (h, lab) for h, lab in zip(*axes[1].get_legend_handles_labels(), strict=True) if lab not in labels
    ]
    if handles or extra:
        fig.legend(
            handles + [h for h, _ in extra],
            labels + [lab for _, lab in extra],
            loc="center right",
            fontsize=8,
        )
    machine, config = result.meta.get("machine", {}), result.meta.get("config", {})
    fig.suptitle(
        f"TC-SSA speed and memory, D={config.get('dim')}, {machine.get('torch_threads')} thread(s), "
        f"{machine.get('cpu')} ({machine.get('cores')} cores); x: out of memory"
    )
    fig.tight_layout(rect=(0, 0, 0.83, 1))
    fig.savefig(path, dpi=120)
