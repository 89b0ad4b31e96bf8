"""The sweep's two plots: downtime against RAM size, and the phases of each update."""

from __future__ import annotations

import statistics
from pathlib import Path

from bench.downtime.report import MODE_NAME, size_name
from bench.downtime.stats import PHASES, group, summary
from vmm.memory import GiB


def plots(records, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group(records)
    if not groups:   # the vCPU sweep alone: its table is the report (no RAM axis to plot)
        return []
    sizes = sorted({k[1] for k in groups})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    styles = {"naive": ("k", "--", "s"), "qemu": ("tab:red", "--", "^")}
    for ax, mode in zip(axes, ("exec", "transfer")):
        for ram, load, color in (("untouched", "idle", "tab:blue"), ("touched", "idle", "tab:green"),
                                 ("untouched", "udp", "tab:orange")):
            xs, ys, lo, hi = [], [], [], []
            for size in sizes:
                rs = groups.get((mode, size, ram, load))
                if rs:
                    s = summary([r["host_us"] for r in rs])
                    xs.append(size / GiB)
                    ys.append(s["median"] / 1000)
                    lo.append(0)
                    hi.append((s["p95"] - s["median"]) / 1000)
            if xs:
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", color=color, capsize=3,
                            label=f"cpr-{mode}, {ram} RAM, {load} (median, bar to p95)")
        for base, (color, ls, mk) in [*styles.items(),
                                      (f"qemu10-{mode}", ("tab:purple", "-.", "D"))]:
            xs, ys = [], []
            for size in sizes:
                rs = groups.get((base, size, "untouched", "idle"))
                if rs:
                    xs.append(size / GiB)
                    ys.append(statistics.median(r["host_us"] for r in rs) / 1000)
            if xs:
                ax.plot(xs, ys, color=color, ls=ls, marker=mk, label=MODE_NAME[base])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks([s / GiB for s in sizes], [size_name(s) for s in sizes])
        ax.set_xlabel("guest RAM")
        ax.set_title(f"pyvmm cpr-{mode}: downtime vs RAM (host view)")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:   # beside the bars, never over them
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        else:   # (a run of the other mode only)
            ax.text(0.5, 0.5, f"no cpr-{mode} in this run", transform=ax.transAxes,
                    ha="center", va="center", color="gray")
    axes[0].set_ylabel("downtime, ms (log)")
    fig.tight_layout()
    p1 = out / "downtime_vs_ram.png"
    fig.savefig(p1, dpi=110, bbox_inches="tight")
    plt.close(fig)

    # One panel per mode, each on its own scale (cpr-exec's bars are ten times taller).
    modes = [m for m in ("exec", "transfer")
             if any(k[0] == m and k[3] == "idle" for k in groups)]
    fig, axes = plt.subplots(1, max(len(modes), 1), figsize=(12, 4.8), squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax, mode in zip(axes[0], modes):
        keys = [k for k in sorted(groups, key=lambda k: (k[2], k[1]))
                if k[0] == mode and k[3] == "idle"]
        base = [0.0] * len(keys)
        for i, ph in enumerate(PHASES):
            vals = []
            for k in keys:
                s = summary([r["phases_us"].get(ph) for r in groups[k]])
                vals.append(s["median"] / 1000 if s else 0.0)
            ax.bar(range(len(keys)), vals, bottom=base, color=colors(i), label=ph)
            base = [a + b for a, b in zip(base, vals)]
        ax.set_xticks(range(len(keys)), [f"{size_name(k[1])}\n{k[2]}" for k in keys],
                      fontsize=8)
        ax.set_ylabel("ms (median of each phase)")
        ax.set_title(f"pyvmm cpr-{mode}: phases (host view, idle)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))   # beside the bars, never over them
    fig.tight_layout()
    p2 = out / "phases.png"
    fig.savefig(p2, dpi=110, bbox_inches="tight")
    plt.close(fig)
    p3 = vs_qemu10(records, out, plt)
    return [p1, p2] + ([p3] if p3 else [])


def vs_qemu10(records, out: Path, plt) -> Path | None:
    """pyvmm beside QEMU 10, interleaved: the switch gap (host-stamped heartbeat) of each."""
    recs = [r for r in records if r.get("vs") == "qemu10"]
    if not recs:
        return None
    modes = [m for m in ("exec", "transfer") if any(r["mode"].endswith(m) for r in recs)]
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        sizes = sorted({r["size"] for r in recs if r["mode"].endswith(mode)})
        for key, label, color in ((mode, f"pyvmm cpr-{mode}", "tab:blue"),
                                  (f"qemu10-{mode}", MODE_NAME[f"qemu10-{mode}"], "tab:purple")):
            xs, ys, hi = [], [], []
            for size in sizes:
                s = summary([r.get("switch_gap_us") for r in recs
                             if r["mode"] == key and r["size"] == size])
                if s:   # QEMU's points a little to the right: the bars do not overlap
                    xs.append(size / GiB * (1.06 if key != mode else 1.0))
                    ys.append(s["median"] / 1000)
                    hi.append((s["p95"] - s["median"]) / 1000)
            if xs:
                ax.errorbar(xs, ys, yerr=[[0] * len(hi), hi], marker="o", color=color,
                            capsize=3, label=f"{label} (median, bar to p95)")
        ax.set_xscale("log", base=2)
        ax.set_xticks([s / GiB for s in sizes], [size_name(s) for s in sizes])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("guest RAM")
        ax.set_ylabel("heartbeat gap at the switch, ms")
        ax.set_title(f"cpr-{mode}: pyvmm vs QEMU 10, same guest, same measure")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "vs_qemu10.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
