"""The benchmark's sections, run in order by ``run_bench``."""

from __future__ import annotations

import copy
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path

import torch
from sklearn.metrics import roc_auc_score
from torch import Tensor
from tqdm.auto import tqdm

import tcssa.bench
from tcssa.bench.config import METHODS, SECTIONS, BenchConfig
from tcssa.bench.measure import (
    interleaved_medians,
    probe_many,
    probe_memory,
    quiet_bfloat16_warning,
    time_call,
)
from tcssa.bench.reference import (
    ReferenceTCSSA,
    batched_warmup,
    build_classifiers,
    train_epoch_batched,
    train_epoch_packed,
    train_epoch_reference,
)
from tcssa.bench.report import BenchResult, evaluate_targets, machine_description, write_outputs
from tcssa.bench.workloads import (
    build_cohort_method,
    build_method,
    cohort_slides,
    method_input,
    synthetic_slide,
    write_h5_slide,
)
from tcssa.data import Cohort, make_kfold_splits, make_synthetic_cohort
from tcssa.data.batching import LengthBucketSampler
from tcssa.io.chunks import compress_h5, iter_h5_chunks
from tcssa.io.features import read_bag
from tcssa.io.published import to_published
from tcssa.method.compressor import TCSSA
from tcssa.method.mixed import refined_share


class _Bench:
    def __init__(self, config: BenchConfig, work_dir: Path, progress: bool) -> None:
        self.config = config
        self.work_dir = work_dir
        self.progress = progress
        self.result = BenchResult()

    def log(self, message: str) -> None:
        if self.progress:
            tqdm.write(message, file=sys.stderr)

    # ------------------------------------------------------------ single slide
    def single_slide(self) -> None:
        c = self.config
        mixed = [f"tcssa-{mode}" for mode in c.mixed_precision]
        methods = [
            "reference",
            "tcssa",
            "tcssa-bf16",
            *mixed,
            *(["tcssa-compiled"] * c.compile),
            *c.alternatives,
        ]
        floors = ["gate-product", "gate-product-bf16", "expert-read", "expert-read-bf16"]
        built = {name: build_method(name, c) for name in methods + floors}
        jobs = [
            {
                "method": m,
                "sizes": c.sizes,
                "config": c,
                "cap_gib": c.memory_cap_gib if "attention" in m else None,
            }
            for m in methods
        ]
        self.log(f"memory probes: {', '.join(methods)} in child processes")
        memory = {
            (row["method"], row["n"]): row for rows in probe_many(jobs, c.probe_workers) for row in rows
        }
        for n in tqdm(c.sizes, desc="single slide", disable=not self.progress, leave=False):
            x = synthetic_slide(n, c.dim, c.seed)
            inputs = {name: method_input(name, x) for name in built}
            # A method whose probe failed (or stopped) at this size is not timed here either.
            runnable = floors + [m for m in methods if memory.get((m, n), {}).get("status") == "ok"]
            calls = {m: (lambda m=m, inputs=inputs: built[m](inputs[m])) for m in runnable}
            # A call that took its probe more than 20 s is timed once (the probe ran it already).
            slow = {m: memory.get((m, n), {}).get("probe_seconds", 0) > 20 for m in calls}
            repeats = {m: 1 if slow[m] else c.repeats for m in calls}
            with torch.inference_mode():
                cpu = {}
                seconds = interleaved_medians(calls, repeats, warmup=n == c.sizes[0], cpu=cpu)
            for name in methods + floors:
                row = {
                    "section": "single slide",
                    "method": name,
                    "n": n,
                    **_memory_fields(memory.get((name, n))),
                }
                if name in seconds:
                    row.update(_time_fields(seconds[name], n, cpu[name]))
                elif "status" not in row:
                    row["status"] = "not run (a smaller N ran out of memory or time)"
                self.result.rows.append(row)
            x = inputs = calls = None  # free this size's slide before the next one
        self._single_slide_ratios()

    def _single_slide_ratios(self) -> None:
        rows = {(r["method"], r["n"]): r for r in self.result.rows if r["section"] == "single slide"}
        for (name, n), row in rows.items():
            ref = rows.get(("reference", n), {})
            floor_part = name.startswith(("gate-product", "expert-read"))
            if "time_ms" in row and "time_ms" in ref and not floor_part:
                row["speedup_vs_reference"] = ref["time_ms"] / row["time_ms"]
                row["cpu_speedup_vs_reference"] = ref["cpu_ms"] / row["cpu_ms"]
            if "peak_rss_mib" in row and "peak_rss_mib" in ref:
                row["peak_rss_vs_reference"] = row["peak_rss_mib"] / ref["peak_rss_mib"]
            suffix = "-bf16" if name.endswith("bf16") else ""
            gate, experts = (
                rows.get((f"gate-product{suffix}", n), {}),
                rows.get((f"expert-read{suffix}", n), {}),
            )
            if name in ("reference", "tcssa", "tcssa-bf16") and "time_ms" in gate and "time_ms" in experts:
                row["floor_ms"] = gate["time_ms"] + experts["time_ms"]
                row["floor_fraction"] = row["floor_ms"] / row["time_ms"]

    # ------------------------------------------------------------ exactness and bfloat16
    def agreement(self) -> None:
        """Our tokens vs the reference's (same weights), and bfloat16 vs float32 routing."""
        c = self.config
        torch.manual_seed(c.seed)
        ours = TCSSA(c.dim, num_slots=c.num_slots).eval()
        reference = ReferenceTCSSA(c.dim, c.num_slots).eval()
        reference.load_state_dict(to_published(ours))
        half = TCSSA(c.dim, num_slots=c.num_slots).eval()
        half.load_state_dict(ours.state_dict())
        half = half.bfloat16()
        x = synthetic_slide(c.agreement_size, c.dim, c.seed + 7)
        with torch.inference_mode():
            full = ours(x)
            ref_tokens = reference(x)[0]
            low = half(x.bfloat16())
        self.result.rows.append(
            {
                "section": "agreement",
                "method": "tcssa vs reference (float32, same weights)",
                "n": c.agreement_size,
                "token_rel_error": _token_rel_error(full.tokens[0], ref_tokens),
            }
        )
        same = (full.topk_index.sort(-1).values == low.topk_index.sort(-1).values).all(-1)
        for mode in c.mixed_precision:  # issue 17: the float32 model, its two products in bfloat16
            ours.set_mixed_precision(mode)
            with torch.inference_mode():
                mixed_out = ours(x)
            ours.set_mixed_precision(None)
            agree = (full.topk_index.sort(-1).values == mixed_out.topk_index.sort(-1).values).all(-1)
            row = {
                "section": "agreement",
                "method": f"tcssa-{mode} vs tcssa (float32)",
                "n": c.agreement_size,
                "top2_agreement": agree.float().mean().item(),
                "token_rel_error": _token_rel_error(full.tokens[0], mixed_out.tokens[0]),
                "worst_slot_rel_error": _worst_slot_rel_error(full.tokens[0], mixed_out.tokens[0]),
            }
            if mode == "bf16-gate":
                share = refined_share(ours.gate, x, ours.tie_margin)
                row["note"] = (
                    f"{100 * share:.1f}% of the patches decided again in float32 (margin {ours.tie_margin:g})"
                )
            self.result.rows.append(row)
        self.result.rows.append(
            {
                "section": "agreement",
                "method": "tcssa-bf16 vs tcssa (float32)",
                "n": c.agreement_size,
                "top2_agreement": same.float().mean().item(),
                "token_rel_error": _token_rel_error(full.tokens[0], low.tokens[0]),
                "worst_slot_rel_error": _worst_slot_rel_error(full.tokens[0], low.tokens[0]),
            }
        )

    # ------------------------------------------------------------ streaming
    def streaming(self) -> None:
        c = self.config
        files = {}
        for n in tqdm(c.stream_sizes, desc="writing h5 slides", disable=not self.progress, leave=False):
            files[str(n)] = str(write_h5_slide(self.work_dir / f"slide_{n}.h5", n, c.dim, c.seed))
        probes = {row["n"]: row for row in probe_memory("tcssa-h5", c.stream_sizes, c, files=files)}
        run = build_method("tcssa-h5", c)
        for n in tqdm(c.stream_sizes, desc="streaming", disable=not self.progress, leave=False):
            repeats = c.repeats if n <= 100_000 else 2
            with torch.inference_mode():
                call, cpu = {"h5": lambda n=n: run(files[str(n)])}, {}
                seconds = interleaved_medians(call, repeats, warmup=n == c.stream_sizes[0], cpu=cpu)["h5"]
            row = {"section": "streaming", "method": "tcssa-h5", "n": n, **_memory_fields(probes.get(n))}
            row.update(_time_fields(seconds, n, cpu["h5"]))
            row["chunk_size"] = c.chunk_size
            self.result.rows.append(row)
        # The same slide the published way, whole in memory as float32: its peak, for contrast.
        largest = max(c.stream_sizes)
        in_memory = probe_memory("reference", [largest], c)[0]
        row = {"section": "streaming", "method": "reference (in memory)", "n": largest}
        row.update(_memory_fields(in_memory))
        row["note"] = "reference (in memory): the float32 slide whole in RAM; memory probe only (not timed)"
        if "probe_seconds" in in_memory:
            row["probe_s"] = in_memory["probe_seconds"]
        self.result.rows.append(row)
        smallest = min(c.stream_sizes)  # exactness against the in-memory forward
        torch.manual_seed(c.seed)
        model = TCSSA(c.dim, num_slots=c.num_slots).eval()
        with torch.inference_mode():
            streamed = compress_h5(model, files[str(smallest)], chunk_size=max(1, smallest // 7))
            whole = model(next(iter_h5_chunks(files[str(smallest)], smallest)))
        self.result.rows.append(
            {
                "section": "agreement",
                "method": "compress_h5 vs in-memory forward (float32)",
                "n": smallest,
                "token_max_abs_diff": (streamed.tokens - whole.tokens).abs().max().item(),
                "token_rel_error": _token_rel_error(whole.tokens[0], streamed.tokens[0]),
            }
        )
        for path in files.values():
            Path(path).unlink(missing_ok=True)

    # ------------------------------------------------------------ cohorts
    def cohort_compression(self) -> None:
        c = self.config
        slides = cohort_slides(c)
        total = sum(len(s) for s in slides)
        methods = [
            "cohort-reference",
            "cohort-batched",
            "cohort-packed",
            "cohort-one-by-one",
            "cohort-padded",
        ]
        probed = methods[:3]
        runs = {m: build_cohort_method(m, c) for m in methods}
        with torch.inference_mode():
            cpu = {}
            seconds = interleaved_medians(
                {m: (lambda m=m: runs[m](slides)) for m in methods}, c.repeats, cpu=cpu
            )
        slides = None  # the memory probes below build their own copy
        probes = probe_many([{"method": m, "sizes": [total], "config": c} for m in probed], c.probe_workers)
        memory = {m: rows[0] for m, rows in zip(probed, probes, strict=True)}
        for m in methods:
            row = {"section": "cohort compression", "method": m, "n": total, **_memory_fields(memory.get(m))}
            row.update(_time_fields(seconds[m], total, cpu[m]))
            row["slides"] = c.cohort_slides
            row["slides_per_s"] = c.cohort_slides / seconds[m]
            row["speedup_vs_reference"] = seconds["cohort-reference"] / seconds[m]
            row["cpu_speedup_vs_reference"] = cpu["cohort-reference"] / cpu[m]
            if m in ("cohort-batched", "cohort-packed", "cohort-padded"):
                row["batch_size"] = c.batch_size
            row["speedup_vs_one_by_one"] = seconds["cohort-one-by-one"] / seconds[m]
            self.result.rows.append(row)

    def cohort_training(self) -> None:
        c = self.config
        slides = cohort_slides(c)
        labels = torch.arange(len(slides)) % 2
        reference, ref_opt, batched, opt = build_classifiers(
            c.dim, 2, c.num_slots, c.seed, c.train_batch_size
        )
        _, _, packed, packed_opt = build_classifiers(c.dim, 2, c.num_slots, c.seed, c.train_batch_size)
        _, _, views, views_opt = build_classifiers(c.dim, 2, c.num_slots, c.seed, c.train_batch_size)
        views.unpadded = True  # the trainer's padded batches, compressed from views of their rows
        sampler = LengthBucketSampler([len(s) for s in slides], c.train_batch_size, seed=c.seed)
        order = list(range(len(slides)))
        warmup = batched_warmup(opt, round(c.train_warmup_epochs * len(sampler)))  # as in the AUC runs
        packed_warmup = batched_warmup(packed_opt, round(c.train_warmup_epochs * len(sampler)))
        views_warmup = batched_warmup(views_opt, round(c.train_warmup_epochs * len(sampler)))
        calls = {
            "train-reference": lambda: train_epoch_reference(reference, ref_opt, slides, labels, order),
            "train-batched": lambda: train_epoch_batched(batched, opt, slides, labels, sampler, warmup),
            "train-packed": lambda: train_epoch_packed(
                packed, packed_opt, slides, labels, sampler, packed_warmup
            ),
            "train-unpadded": lambda: train_epoch_batched(
                views, views_opt, slides, labels, sampler, views_warmup
            ),
        }
        cpu = {}
        seconds = interleaved_medians(calls, c.train_repeats, cpu=cpu)
        for m, s in seconds.items():
            row = {"section": "cohort training", "method": m, "n": sum(len(x) for x in slides)}
            row.update(_time_fields(s, row["n"], cpu[m]))
            row["slides"] = len(slides)
            row["slides_per_s"] = len(slides) / s
            row["speedup_vs_reference"] = seconds["train-reference"] / s
            row["cpu_speedup_vs_reference"] = cpu["train-reference"] / cpu[m]
            how = {
                "train-packed": "lists of slides, no padding (forward_slides)",
                "train-unpadded": "padded and masked, compressed from views of the real rows (unpadded=True)",
            }.get(m, "masked")
            row["note"] = (
                "one slide per step, AdamW default (per-parameter loop)"
                if m == "train-reference"
                else f"{c.train_batch_size} slides per step (bucketed, {how}), fused AdamW, "
                f"model: {type(batched).__module__}.{type(batched).__name__}"
            )
            self.result.rows.append(row)

    def cohort_auc(self) -> None:
        """Both training loops on synthetic rare-lesion cohorts (issue 4's task), same epochs; the
        test AUC of each, of the batched model run in bfloat16, and their mean over ``auc_seeds``
        cohorts (one 10-epoch AUC on 120 slides moves by up to 0.25 with the seed, for both loops)."""
        c = self.config
        seeds = range(c.seed, c.seed + c.auc_seeds)
        matches = [0, 0]  # top-2 of the trained gate, bfloat16 vs float32: equal, patches
        per_seed = []
        for seed in tqdm(
            seeds, desc="auc cohorts", disable=not self.progress or len(seeds) == 1, leave=False
        ):
            rows = self._auc_one_cohort(seed, matches)
            self.result.rows.extend(rows)
            per_seed.append(rows)
        for i, first in enumerate(per_seed[0]):
            aucs = [rows[i]["test_auc"] for rows in per_seed if rows[i]["test_auc"] is not None]
            summary = {"section": "auc", "method": first["method"], "seed": "mean", "status": "ok"}
            summary["slides"] = first["slides"]
            summary["test_auc"] = statistics.mean(aucs) if aucs else None
            if len(aucs) > 1:
                summary["test_auc_se"] = statistics.stdev(aucs) / len(aucs) ** 0.5
            if "epochs" in first:
                summary["epochs"] = statistics.mean(rows[i]["epochs"] for rows in per_seed)
            if "time_ms" in first:
                summary["time_ms"] = statistics.mean(rows[i]["time_ms"] for rows in per_seed)
                reference_ms = statistics.mean(rows[0]["time_ms"] for rows in per_seed)
                summary["speedup_vs_reference"] = reference_ms / summary["time_ms"]
            summary["note"] = f"mean over {len(per_seed)} cohort(s), seeds {seeds[0]}..{seeds[-1]}"
            self.result.rows.append(summary)
        self.result.rows.append(
            {
                "section": "agreement",
                "method": "trained tcssa-bf16 vs float32 (rare cohort test slides)",
                "n": matches[1],
                "top2_agreement": matches[0] / matches[1],
            }
        )

    def _auc_one_cohort(self, seed: int, matches: list[int]) -> list[dict]:
        c = self.config
        low, high = c.auc_patches
        total = c.auc_slides + c.auc_test_slides  # one cohort (one seed: the same tissue geometry)
        synth = make_synthetic_cohort(
            self.work_dir / f"rare-{seed}", "rare", total, c.auc_dim, seed, low, high, progress=False
        )
        cohort = Cohort.from_folder(synth.features_dir, synth.labels_csv, check_files=False)  # just written
        # Two folds grouped by case: about half the slides to learn from, half to test on.
        split = make_kfold_splits(cohort, folds=2, seed=seed)[0]
        train_ids, test_ids = split.train + split.val, split.test
        load = lambda ids, dtype=torch.float32: [read_bag(cohort.paths[i], dtype).features for i in ids]  # noqa: E731
        train_x, test_x = load(train_ids), load(test_ids)
        train_y = torch.tensor([cohort.labels[i] for i in train_ids])
        test_y = [cohort.labels[i] for i in test_ids]
        reference, ref_opt, batched, opt = build_classifiers(
            c.auc_dim, cohort.num_classes, c.num_slots, seed, c.train_batch_size, c.learning_rate
        )
        sampler = LengthBucketSampler([len(x) for x in train_x], c.train_batch_size, seed=seed)
        warmup = batched_warmup(opt, round(c.train_warmup_epochs * len(sampler)))
        rng = torch.Generator().manual_seed(seed)
        seconds = {"train-reference": 0.0, "train-batched": 0.0}
        for epoch in tqdm(range(c.auc_epochs), desc="auc training", disable=not self.progress, leave=False):
            order = torch.randperm(len(train_x), generator=rng).tolist()
            sampler.set_epoch(epoch)
            seconds["train-reference"] += time_call(
                train_epoch_reference, reference, ref_opt, train_x, train_y, order
            )
            seconds["train-batched"] += time_call(
                train_epoch_batched, batched, opt, train_x, train_y, sampler, warmup
            )
        test_half = load(test_ids, torch.bfloat16)  # float16 on disk straight to bfloat16
        low_precision = copy.deepcopy(batched).bfloat16()
        batched.eval(), low_precision.eval()  # for the routing compared below (predict sets eval itself)
        scores = {
            "train-reference": _class1_scores(reference.predict, test_x),
            "train-batched": _class1_scores(batched.predict, test_x),
            "train-batched, eval in bfloat16": _class1_scores(low_precision.predict, test_half),
        }
        # top-2 agreement of the trained gate, bfloat16 vs float32 (before any further training)
        with torch.inference_mode():
            for x, h in zip(test_x, test_half, strict=True):
                same = (
                    batched.routing(x).topk_index.sort(-1).values
                    == low_precision.routing(h).topk_index.sort(-1).values
                )
                matches[0] += int(same.all(-1).sum())
                matches[1] += len(x)
        epochs = {"train-reference": c.auc_epochs, "train-batched": c.auc_epochs}
        if c.auc_equal_time:
            # What a user with the reference's time budget gets: the batched loop trained on until
            # its training time reaches the reference's (at most 4x the epochs).
            same_time, spent, more = "train-batched, same training time", seconds["train-batched"], 0
            while spent < seconds["train-reference"] and more < 3 * c.auc_epochs:
                sampler.set_epoch(c.auc_epochs + more)
                spent += time_call(train_epoch_batched, batched, opt, train_x, train_y, sampler, warmup)
                more += 1
            scores[same_time] = _class1_scores(batched.predict, test_x)
            seconds[same_time], epochs[same_time] = spent, c.auc_epochs + more
        common = {"section": "auc", "seed": seed, "slides": len(train_ids), "n": sum(len(x) for x in train_x)}
        rows = []
        for method, score in scores.items():
            row = {**common, "method": method, "test_auc": _auc(test_y, score), "status": "ok"}
            trained = seconds.get(method)
            if trained:
                row["epochs"] = epochs[method]
                row.update(time_ms=1000 * trained, slides_per_s=epochs[method] * len(train_ids) / trained)
                row["speedup_vs_reference"] = seconds["train-reference"] / trained
            row["note"] = (
                f"synthetic 'rare' cohort of {total} slides (D={c.auc_dim}, N {low:,}-{high:,}), split by "
                f"case: {len(train_ids)} to train on, {len(test_y)} to test on; {c.auc_epochs} epochs each; "
                f"lr {c.learning_rate:g} one slide per step; {c.train_batch_size} per step: lr "
                f"{c.learning_rate:g} x {c.train_batch_size}, warmed up over {c.train_warmup_epochs:g} epochs"
            )
            rows.append(row)
        return rows


@torch.inference_mode()
def _class1_scores(predict: Callable[[Tensor], Tensor], slides: list[Tensor]) -> list[float]:
    """The last class's probability of each slide, from a ``MILModel.predict``."""
    return [float(predict(x)[0, -1]) for x in slides]


def _auc(labels: list[int], scores: list[float]) -> float | None:
    return float(roc_auc_score(labels, scores)) if len(set(labels)) == 2 else None


def _time_fields(seconds: float, n: int, cpu_seconds: float | None = None) -> dict:
    fields = {"time_ms": 1000 * seconds, "us_per_patch": 1e6 * seconds / n, "status": "ok"}
    if cpu_seconds is not None:
        fields["cpu_ms"] = 1000 * cpu_seconds
    return fields


def _memory_fields(probe: dict | None) -> dict:
    if not probe:
        return {}
    out = {k: probe[k] for k in ("peak_rss_mib", "work_mib", "probe_s") if k in probe}
    if probe.get("status", "ok") != "ok":
        out["status"] = probe["status"]
    return out


def _token_rel_error(expected: Tensor, got: Tensor) -> float:
    """||Y - Y'|| / ||Y|| over the K x D tokens of one slide."""
    expected, got = expected.float(), got.float()
    return ((got - expected).norm() / expected.norm().clamp_min(1e-12)).item()


def _worst_slot_rel_error(expected: Tensor, got: Tensor) -> float:
    """max over slots of ||y_k - y'_k|| / ||y_k||: a slot of few patches moves most."""
    expected, got = expected.float(), got.float()
    return ((got - expected).norm(dim=-1) / expected.norm(dim=-1).clamp_min(1e-12)).max().item()


def run_bench(
    config: BenchConfig, out_dir: str | Path, sections: Sequence[str] = SECTIONS, progress: bool = True
) -> tuple[BenchResult, dict[str, Path]]:
    """Run the benchmark sections, write bench.json, bench.csv and bench_scaling.png into ``out_dir``."""
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown bench section(s) {sorted(unknown)}; choose from {list(SECTIONS)}")
    start = time.perf_counter()
    load = os.getloadavg if hasattr(os, "getloadavg") else lambda: None
    machine = {**machine_description(), "load_average_start": load()}
    default_threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    machine["torch_threads"] = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="tcssa-bench-") as work:
        bench = _Bench(config, Path(work), progress)
        steps = {
            "single": bench.single_slide,
            "agreement": bench.agreement,
            "streaming": bench.streaming,
            "cohort": bench.cohort_compression,
            "training": bench.cohort_training,
            "auc": bench.cohort_auc,
        }
        section_seconds = {}
        with warnings.catch_warnings():
            quiet_bfloat16_warning()
            for name in tqdm([s for s in SECTIONS if s in sections], desc="bench", disable=not progress):
                began = time.perf_counter()
                steps[name]()
                section_seconds[name] = round(time.perf_counter() - began, 1)
    machine["load_average_end"] = load()
    torch.set_num_threads(default_threads)
    result = bench.result
    result.meta = {
        "command": "tcssa bench" + (" --quick" if config.quick else ""),
        "config": asdict(config),
        "machine": machine,
        "seconds": time.perf_counter() - start,
        "section_seconds": section_seconds,
        "methods": METHODS,
        "how": _how_it_measures(),
    }
    result.targets = evaluate_targets(result, config)
    return result, write_outputs(result, Path(out_dir))


def _how_it_measures() -> str:
    # the package's docstring says how
    return tcssa.bench.__doc__.split("How it measures", 1)[1].split("Modules:", 1)[0].strip()


def measure_h5_streaming(
    work_dir: str | Path, num_patches: int, dim: int = 1024, chunk_size: int = 16_384
) -> dict:
    """Write a float16 slide of ``num_patches`` x ``dim`` and compress it with compress_h5 in a child
    process; returns that child's peak RSS and time (the bounded-memory check of the slow test)."""
    config = replace(BenchConfig(), dim=dim, chunk_size=chunk_size)
    path = write_h5_slide(Path(work_dir) / f"slide_{num_patches}.h5", num_patches, dim)
    return probe_memory("tcssa-h5", [num_patches], config, files={str(num_patches): str(path)})[0]
