"""The timing harness behind tools/benchmark.py: a round-robin timer whose ratios stay meaningful
on a loaded machine, the ratios between its rows, and the result table. What it times (synthetic
inputs, detectors, FLOP counts) is in :mod:`.benchmark_models`."""

import contextlib
import logging
import time

import numpy as np
import torch
import tqdm

__all__ = [
    "Benchmark",
    "add_ratios",
    "find_row",
    "format_table",
    "headline_figures",
    "paired_ratio",
]

logger = logging.getLogger("thyroid_det.benchmark")


def paired_ratio(times, reference_times):
    """Median over rounds of time / reference time, both taken in the same round-robin round."""
    return float(np.median(np.asarray(times) / np.asarray(reference_times)))


class Benchmark:
    """Shared settings of one run (device, autocast, warm-up, profiling, clock) and what it
    measured: ``rows`` (one per timing), ``models`` (what was timed), ``profiles``."""

    CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}

    def __init__(self, device="cpu", amp=False, warmup=1, profile=0, clock="wall"):
        """
        Args:
            amp (bool): run the timed calls under bfloat16 autocast.
            warmup (int): untimed calls of each callable before the timed rounds.
            profile (int): with N > 0, :meth:`profile` keeps the N costliest ops of a call.
            clock (str): "wall" (elapsed time) or "cpu" (the process's CPU time: on a machine
                with more runnable threads than cores, it leaves out the time the process
                waits for a core; with one torch thread, that is the time the work itself
                takes).
        """
        if clock not in self.CLOCKS:
            raise ValueError(f"Unknown clock {clock!r}; expected one of {sorted(self.CLOCKS)}")
        self.device = torch.device(device)
        self.amp, self.warmup, self.num_profiled_ops = amp, warmup, profile
        self.clock = clock
        self.rows, self.models, self.profiles = [], {}, {}
        self._groups = 0

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def time_round_robin(self, fns, repeats):
        """Time the callables ``fns`` (name -> fn) in turn, ``repeats`` rounds after the warm-up.

        Taking turns means a change of load on a shared machine hits every callable alike, so
        ratios between them (:func:`paired_ratio`) stay meaningful when absolute times do not.

        Returns:
            group id, and per name: median, quartiles, IQR and the times of every round.
        """
        for fn in fns.values():
            for _ in range(self.warmup):
                fn()
        times = {name: [] for name in fns}
        now = self.CLOCKS[self.clock]
        for _ in tqdm.trange(repeats, desc=", ".join(map(str, fns)), leave=False, disable=None):
            for name, fn in fns.items():
                self.sync()
                start = now()
                fn()
                self.sync()
                times[name].append(now() - start)
        self._groups += 1
        timings = {}
        for name, ts in times.items():
            q1, median, q3 = (float(v) for v in np.percentile(ts, [25, 50, 75]))
            timings[name] = {
                "median_s": median, "q1_s": q1, "q3_s": q3, "iqr_s": q3 - q1, "times_s": ts
            }
        return self._groups, timings

    def add(self, model, kind, batch, timing, group, **extra):
        """Record a row; per-image time = median per call / batch."""
        row = {"model": model, "kind": kind, "batch": batch, "group": group, **timing}
        row["per_image_s"] = timing["median_s"] / batch
        row["images_per_s"] = batch / timing["median_s"]
        row.update(extra)
        self.rows.append(row)
        logger.info(
            f"{model:<10} {kind:<26} batch {batch:>2}: {1e3 * row['per_image_s']:9.1f} ms/image "
            f"(IQR {1e3 * timing['iqr_s']:.1f} ms per call)"
        )
        return row

    def profile(self, name, fn):
        """Profile one call of ``fn`` (torch.profiler) and keep its costliest ops, as data and as
        the profiler's own table; a no-op unless ``profile`` > 0."""
        if not self.num_profiled_ops:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            fn()
            self.sync()
        averages = prof.key_averages()
        events = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events) or 1.0
        top = [
            {
                "op": e.key,
                "self_cpu_ms": e.self_cpu_time_total / 1e3,
                "self_cpu_share": e.self_cpu_time_total / total,
                "calls": e.count,
            }
            for e in events[: self.num_profiled_ops]
        ]
        table = averages.table(sort_by="self_cpu_time_total", row_limit=self.num_profiled_ops)
        self.profiles[name] = {"total_self_cpu_ms": total / 1e3, "top_ops": top, "table": table}


def find_row(rows, model, kind, batch=None):
    """The first row of ``model`` and ``kind`` (at ``batch`` if given), or None."""
    for row in rows:
        if row["model"] == model and row["kind"] == kind and batch in (None, row["batch"]):
            return row
    return None


def _ratio(row, ref):
    """Per-image time over the reference row's: paired when both were timed in turns."""
    if ref is None:
        return None
    if ref["group"] == row["group"] and row["batch"] == ref["batch"]:
        return paired_ratio(row["times_s"], ref["times_s"])
    return row["per_image_s"] / ref["per_image_s"]


def add_ratios(bench):
    """Every row of ours against the reference's matching row (inference rows of the refiner and
    the cascade against its batch-1 inference, training rows against its training step), the
    cascade's inference against Ec's, and FLOP rates against the matrix-multiply peak."""
    rows = bench.rows
    for row in rows:
        if row["model"] in ("reference", "mapper"):
            continue
        if row["kind"] in ("inference", "train_step"):
            ref = find_row(rows, "reference", row["kind"], row["batch"])
        elif row["kind"].startswith("train_step"):
            ref = find_row(rows, "reference", "train_step")
        else:
            ref = find_row(rows, "reference", "inference", 1)
        row["vs_reference"] = _ratio(row, ref)
        if row["model"] == "cascade" and row["kind"].startswith("inference"):
            row["vs_ec"] = _ratio(row, find_row(rows, "ec", "inference (cascade's Ec)"))

    peak = bench.models.get("matmul_peak", {}).get("gflops_per_s")
    for name in ("reference", "ec", "ec_matched"):
        info, row = bench.models.get(name, {}), find_row(rows, name, "inference", 1)
        if info.get("gflops") and row:
            info["achieved_gflops_per_s"] = info["gflops"] / row["median_s"]
            if peak:
                info["share_of_matmul_peak"] = info["achieved_gflops_per_s"] / peak


def _fmt(value, spec):
    return "" if value is None else format(value, spec)


def format_table(bench):
    """The rows, what was timed, and the profiler's tables, as text."""
    lines = [
        f"{'model':<10} {'measurement':<26} {'batch':>5} {'ms/image':>10} {'IQR ms':>8} "
        f"{'img/s':>7} {'x ref':>6} {'x Ec':>6}"
    ]
    for row in bench.rows:
        lines.append(
            f"{row['model']:<10} {row['kind']:<26} {row['batch']:>5} "
            f"{1e3 * row['per_image_s']:>10.1f} {1e3 * row['iqr_s']:>8.1f} "
            f"{row['images_per_s']:>7.2f} {_fmt(row.get('vs_reference'), '.2f'):>6} "
            f"{_fmt(row.get('vs_ec'), '.2f'):>6}"
        )
    lines.append("(x ref, x Ec: time ratios; paired over rounds where the two were timed in turns)")
    lines.append("")
    for name, info in bench.models.items():
        shown = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in info.items()
            if not isinstance(v, (dict, list))
        )
        lines.append(f"{name}: {shown}")
    for name, prof in bench.profiles.items():
        lines.append(f"\nprofile {name} (total self CPU {prof['total_self_cpu_ms']:.0f} ms):")
        lines.append(prof["table"])
    return "\n".join(lines)


def headline_figures(bench):
    """The figures README's Speed section sets targets for, measured (None if not run): Ec (SSD's
    boxes) vs the reference, the cascade at <= 10 detections vs Ec, and whether two mapper
    workers feed Ec's training."""
    rows, figures = bench.rows, []

    def figure(name, description, value, **extra):
        figures.append({"figure": name, "description": description, "value": value, **extra})

    row = find_row(rows, "ec_matched", "inference", 1)
    figure(
        "ec_inference_vs_reference",
        "Ec inference, anchors matched, batch 1: time / torchvision SSD's",
        row and row.get("vs_reference"),
    )
    cascade = [r["vs_ec"] for r in rows if r.get("vs_ec") is not None and r["detections"] <= 10]
    figure(
        "cascade_vs_ec_up_to_10",
        "cascade inference, <= 10 detections: worst time / Ec's",
        max(cascade) if cascade else None,
    )
    row = find_row(rows, "ec_matched", "train_step")
    figure(
        "train_vs_reference",
        "Ec training iteration, anchors matched: time / torchvision SSD's",
        row and row.get("vs_reference"),
    )
    mapper = find_row(rows, "mapper", "train mapping, 1 worker")
    train = find_row(rows, "ec", "train_step") or find_row(rows, "ec_matched", "train_step")
    value, workers = None, None
    if mapper and train:
        value = train["images_per_s"] / (2 * mapper["images_per_s"])
        workers = int(np.ceil(train["images_per_s"] / mapper["images_per_s"]))
    figure(
        "mapper_feeds_training",
        "Ec training images/s / two mapper workers' images/s",
        value,
        workers_needed=workers,
    )
    return figures
