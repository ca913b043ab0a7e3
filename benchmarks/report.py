"""Output of benchmarks/bench.py: the progress lines on stderr, the Markdown table (header,
columns, legend), the PNG of fused's speed-ups and the JSON records. Everything here reads the
records bench.py builds (one dict per row, keys as in ``CaseRun.record``) and measures nothing."""

from __future__ import annotations

import json
import os
import sys
import time

import torch


class Progress:
    """One stderr line per row as it starts: rows done and left, seconds since the start."""

    def __init__(self, total):
        self.total, self.done = total, 0
        self.t_start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def skip(self, rows):
        self.done += rows

    def __call__(self, what):
        self.done += 1
        print(
            f"[{self.done}/{self.total}, {self.total - self.done} left after this, "
            f"{self.elapsed():.0f}s] {what}",
            file=sys.stderr,
            flush=True,
        )


def fmt(v, spec="{:.3f}"):
    """A number for the table; a dash where there is none."""
    return "—" if v is None else spec.format(v)


def header_lines(env, backend):
    """The Markdown title and the run's environment (env: the keys every record carries)."""
    copy_gbps, load = env["copy_gbps"], env["loadavg_at_start"]
    return [
        f"# MC-Loss benchmark — {env['device']}: {env['device_name']}",
        f"torch {env['torch']} (CUDA {torch.version.cuda}), {env['threads']} CPU threads, "
        f"{env['date']}; mcloss_cuda backend on {env['device']}: **{backend}**"
        + (f"; device-to-device copy bandwidth {copy_gbps:.0f} GB/s" if copy_gbps else "")
        + (f"; 1-min load average at start {load:.2f}" if load is not None else ""),
    ]


def markdown(records, header, device, skipped):
    """The table of every row, under ``header`` (header_lines), with its legend."""
    cuda = device.type == "cuda"
    cols = [
        "shape (B,C,H,W)",
        "groups",
        "dtype",
        "impl",
        "backend",
        "fwd ms",
        "fwd+bwd ms",
        "fused speed-up fwd",
        "fused speed-up fwd+bwd",
        "saved for bwd MiB (% of x)",
    ]
    if cuda:
        cols += ["peak extra MiB", "BW GB/s (% of copy)"]
    else:
        cols += ["page faults / fwd+bwd"]
    cols += ["/ softmax", "check"]
    out = list(header) + [
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "|".join("---" for _ in cols) + "|",
    ]
    for r in records:
        saved = (
            "—"
            if r["saved_bytes"] is None
            else f"{r['saved_bytes'] / 2**20:.1f} ({r['saved_pct_of_x']:.0f}%)"
        )
        row = [
            "x".join(map(str, r["shape"])),
            str(r["groups"]),
            r["dtype"],
            r["impl"],
            r["backend"],
            fmt(r["fwd_ms"]),
            fmt(r["fwd_bwd_ms"]),
            fmt(r.get("fused_speedup_fwd"), "{:.2f}x"),
            fmt(r.get("fused_speedup_fwd_bwd"), "{:.2f}x"),
            saved,
        ]
        if cuda:
            row.append(
                fmt(
                    None if r["peak_extra_bytes"] is None else r["peak_extra_bytes"] / 2**20,
                    "{:.1f}",
                )
            )
            row.append(
                "—"
                if r["bw_gbps"] is None
                else f"{r['bw_gbps']:.0f}"
                + (
                    ""
                    if r["bw_share_of_copy"] is None
                    else f" ({100 * r['bw_share_of_copy']:.0f}%)"
                )
            )
        else:
            key = "fwd_page_faults" if r["impl"] == "softmax" else "fwd_bwd_page_faults"
            row.append(fmt(r.get(key), "{:.0f}"))
        row.append(fmt(r.get("softmax_passes"), "{:.2f}"))
        flags = [r["check"]] if r["check"] else []
        if r.get("note"):
            flags.append(r["note"])
        if r.get("error"):
            flags.append("ERROR " + r["error"].replace("|", "/")[:120])
        row.append("; ".join(flags))
        out.append("| " + " | ".join(row) + " |")
    out += [
        "",
        "Legend: times are medians after warm-up, every row of a shape timed side by side in "
        "interleaved rounds (forward with autograd recording; forward+"
        "backward includes `loss.backward()`). `fused speed-up` = this row's time / fused's time "
        "(>1: fused is faster). `saved for bwd` = unique storages autograd keeps, the input "
        "features excluded. `/ softmax` = this row's fwd+bwd time in units of one forward "
        "softmax over the same map (target for fused: <= 2.5). eager builds its mask on the "
        "host every step (as published) and copies it to the device; fused, reference and "
        "compiled take one precomputed mask. eager/compiled compute in the input dtype; "
        "fused/reference accumulate half precision in fp32. `check`: loss vs fused on the same "
        "mask.",
    ]
    if cuda:
        out.append(
            "GPU: inputs evicted from L2 before each timed run; `peak extra` = peak "
            "allocation during one fwd+bwd above what was allocated before (includes "
            "x.grad); `BW` = (read x fwd + read x bwd + write dx) / fwd+bwd time, and "
            "its share of the device-to-device copy bandwidth measured in this run."
        )
    if not cuda:
        out.append(
            "CPU: `page faults` = median minor page faults per timed fwd+bwd (forward "
            "for softmax), whole process: fresh pages the OS zeroes because the "
            "allocator had returned freed outputs to it; 4 KiB each (about 3,700 per "
            "15 MB output)."
        )
    if skipped:
        out.append("Not run (time limit reached): " + ", ".join(skipped))
    return "\n".join(out)


def _plot_label(r):
    g = f"cnum={r['groups']}" if r["groups"] != "balanced" else "balanced (uneven)"
    return f"{'x'.join(map(str, r['shape']))}\n{g}"


def plot(records, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = list(dict.fromkeys(r["dtype"] for r in records))
    others = [i for i in ("eager", "compiled", "reference") if any(r["impl"] == i for r in records)]
    fig, axes = plt.subplots(len(dtypes), 1, figsize=(10, 4 * len(dtypes)), squeeze=False)
    for ax, dt in zip(axes[:, 0], dtypes):
        rows = [r for r in records if r["dtype"] == dt]
        labels = list(dict.fromkeys(_plot_label(r) for r in rows))
        width = 0.8 / max(1, len(others))
        for j, impl in enumerate(others):
            ys = []
            for lab in labels:
                r = next((r for r in rows if r["impl"] == impl and _plot_label(r) == lab), None)
                ys.append(r.get("fused_speedup_fwd_bwd") if r else None)
            xs = [i + (j - (len(others) - 1) / 2) * width for i in range(len(labels))]
            vals = [y if y is not None else 0 for y in ys]
            bars = ax.bar(xs, vals, width, label=f"over {impl}")
            for b, y in zip(bars, ys):
                ax.annotate(
                    "n/a" if y is None else f"{y:.1f}",
                    (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel("fused speed-up (fwd+bwd)")
        backend = next((r["backend"] for r in rows if r["impl"] == "fused"), "?")
        ax.set_title(f"{rows[0]['device_name']} — {dt} — fused backend: {backend}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(records, path):
    """Through a temporary file, so that a run killed while writing leaves the previous copy."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(records, f, indent=1)
    os.replace(tmp, path)
