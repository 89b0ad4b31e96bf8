"""`pyvmm cpr --trace-plot FILE`: the student's own live update, drawn.

The picture is made from what the update measured (query-migrate's `x-timeline`
and `x-steps`, CLOCK_MONOTONIC stamps taken where each step happened), nothing
else: one lane per process (the old and the new pyvmm; for cpr-exec one PID
whose image changes at `execve`, with the prebuilder thread and the holder
process beside it), the guest's own bar (running, stopped: the downtime
shaded), the messages between the processes, the RAM memfd that both map
(drawn once: it is never copied), and the fault points (`--fault NAME`) at the
places where they strike, each of which rolls the update back until the
point of no return.

matplotlib is optional (`pip install -e '.[bench]'`); `check()` says so
before the update starts, not after.
"""

from __future__ import annotations

from ..cpr.timeline import lane
from ..errors import VmmError

# Where each fault point strikes: (fault, the phase it strikes in, side).
FAULT_AT = {
    "cpr-transfer": [("prepare", "setup"), ("target-prepare", "setup"),
                     ("after-stop", "quiesce"), ("notify", "notify"), ("save", "save"),
                     ("transfer", "transfer"), ("target-crash-before-fds", "transfer"),
                     ("target-crash-after-fds", "restore"), ("target-restore", "restore")],
    "cpr-exec": [("after-stop", "quiesce"), ("notify", "notify"), ("save", "save"),
                 ("exec", "transfer")],
}

RUNNING, STOPPED = "#4caf50", "#e53935"
OLD, NEW, SIDE = "#1e88e5", "#8e24aa", "#fb8c00"
PHASE_COLOURS = {"setup": "#bbdefb", "stop": "#ef9a9a", "quiesce": "#ffcc80",
                 "notify": "#fff59d", "save": "#c5e1a5", "transfer": "#80deea",
                 "restore": "#ce93d8", "resume": "#a5d6a7", "rollback": "#a5d6a7"}


def check(path: str) -> None:
    """Refuse, before any update starts, what could not be drawn at the end."""
    if not path.lower().endswith((".svg", ".png")):
        raise VmmError(f"--trace-plot {path}: give a file name ending in .svg or .png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise VmmError("--trace-plot needs matplotlib: pip install -e '.[bench]' "
                       "(make build installs it)") from None


def _find(steps, *words):
    """The stamp of the first step whose text contains every word, or None."""
    for text, t in steps:
        if all(w in text for w in words):
            return t
    return None


def messages(info: dict) -> list[tuple[str, int, int, str]]:
    """(label, sent at, received at, direction 'old->new' | 'new->old') from the stamps."""
    marks = dict((name, t) for name, t in info.get("x-timeline", []))
    steps = info.get("x-steps", [])
    out = []
    if info.get("mode") == "cpr-exec":
        first = _find(steps, "Python runs its first line")
        if "transfer" in marks and first:
            out.append(("execve: state memfd, RAM memfd and device fds inherited",
                        marks["transfer"], first, "old->new"))
        return out
    pairs = [
        ("hello + RAM memfd", _find(steps, "old:", "hello"), _find(steps, "new:", "hello"),
         "old->new"),
        ("prepared", _find(steps, "new:", "\"prepared\" sent"),
         _find(steps, "old:", "\"prepared\" received"), "new->old"),
        ("state + device fds", _find(steps, "old:", "fds sent"), marks.get("restore"),
         "old->new"),
        ("restored", _find(steps, "new:", "state written"),
         _find(steps, "old:", "\"restored\" received"), "new->old"),
        ("go (point of no return)", _find(steps, "old:", "sending \"go\""),
         _find(steps, "new:", "\"go\" received"), "old->new"),
        # (since protocol 2 "go" is no message: the new VMM claims the commit word both
        # map, which the old one reads; drawn as a new->old arrow at that instant)
        ("go (point of no return): commit page claimed", _find(steps, "new:", "guest claimed"),
         _find(steps, "new:", "guest claimed"), "new->old"),
    ]
    for label, sent, received, direction in pairs:
        if sent is not None and received is not None:
            out.append((label, sent, received, direction))
    if "resume" in marks:
        out.append(("running", marks["resume"], marks["resume"], "new->old"))
    return out


def draw(info: dict, path: str) -> None:
    """Write the picture of one live update (query-migrate of the VMM running the guest).

    cpr-transfer's setup (before the stop) takes far longer than the downtime, so it
    gets a panel of its own at its own scale, left of the stop -> resume panel."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams["svg.fonttype"] = "none"   # SVG text stays text: searchable, editable

    mode = info.get("mode", "cpr-transfer")
    marks = [(n, t) for n, t in info.get("x-timeline", []) if t is not None]
    m = dict(marks)
    if "stop" not in m:
        raise VmmError(f"the live update {info.get('status', 'ended')} before the guest was "
                       "stopped: there is no sequence to draw")
    if "resume" not in m and "rollback" not in m:
        raise VmmError("the live update reported no complete timeline to draw "
                       f"(status {info.get('status', 'unknown')})")
    steps = sorted((s for s in info.get("x-steps", []) if s[1] is not None),
                   key=lambda s: s[1])
    plot = _Plot(info, mode, marks, steps)
    key = [f"{n:>2}. {plot.ms(t):9.3f} ms  {text}" for n, (text, t) in enumerate(steps, 1)]
    key += [f"{f}: {plot.ms(t):9.3f} ms  {name} (--fault {name}): rolls back, the guest "
            f"resumes in the old pyvmm" for f, name, t in plot.faults]
    height = 5.6 + 0.13 * len(key)
    if "setup" in m:
        fig, (left, right) = plt.subplots(1, 2, sharey=True, figsize=(13, height),
                                          gridspec_kw={"width_ratios": [1, 2.4],
                                                       "wspace": 0.04})
        pad = (m["stop"] - m["setup"]) / 1e6 * 0.03
        plot.draw_on(left, plot.ms(m["setup"]) - pad, plot.ms(m["stop"]) + pad)
        right_from = plot.ms(m["stop"])
        left.set_title("before the stop (setup: the guest runs)", fontsize=9)
        right.spines["left"].set_linestyle((0, (2, 3)))
        axes = [left, right]
    else:
        fig, right = plt.subplots(figsize=(13, height))
        right_from = plot.ms(m["stop"])
        axes = [right]
    width = plot.ms(plot.end) - right_from
    plot.draw_on(right, right_from - width * 0.03, plot.ms(plot.end) + width * 0.12)
    right.set_title("stop -> rollback (the guest is stopped, then runs on in the old pyvmm)"
                    if plot.rolled_back else "stop -> resume (the guest is stopped: downtime)",
                    fontsize=9)
    plot.label_lanes(axes[0])
    right.set_xlabel(f"ms since the {marks[0][0]} (CLOCK_MONOTONIC, shared by every process)",
                     fontsize=8.5)
    title = f"pyvmm live update ({mode}): who does what, when"
    if plot.rolled_back:
        title = (f"pyvmm live update ({mode}) {info.get('status', 'failed')} and rolled back:"
                 f"\n{info.get('error-desc', '')}")
    fig.suptitle(title, fontsize=10, x=0.02, ha="left")
    handles = [plt.Rectangle((0, 0), 1, 1, color=PHASE_COLOURS[p]) for p in PHASE_COLOURS
               if p in m]
    fig.legend(handles, [p for p in PHASE_COLOURS if p in m], ncol=8, fontsize=7.5,
               loc="upper right", frameon=False)
    fig.text(0.01, 0.01, "\n".join(key), fontsize=6.8, family="monospace", va="bottom")
    fig.subplots_adjust(bottom=(0.6 + 0.13 * len(key)) / height, left=0.12, right=0.98,
                        top=1 - (0.8 if plot.rolled_back else 0.55) / height)
    fig.savefig(path)
    plt.close(fig)


class _Plot:
    """The lanes and what goes on them, drawable on any time window (one axis each)."""

    def __init__(self, info, mode, marks, steps):
        self.info, self.mode, self.marks, self.steps = info, mode, marks, steps
        self.m = dict(marks)
        self.rolled_back = "resume" not in self.m
        self.end = self.m["rollback"] if self.rolled_back else self.m["resume"]
        self.t0 = marks[0][1]
        self.exec_mode = mode == "cpr-exec"
        self.y = {"guest": 5.0, "old": 3.8}
        if self.exec_mode:
            self.y.update(new=3.8, prebuilder=2.7, holder=1.9)
            self.names = {"old": "pyvmm (one PID):\nold image, then\nnew image",
                          "prebuilder": "prebuilder\n(thread, C)",
                          "holder": "holder\n(child process)"}
        else:
            self.y["new"] = 2.3
            self.names = {"old": "old pyvmm", "new": "new pyvmm"}
            if any(text.startswith("handoff") for text, _ in steps):   # (the early start)
                self.y["handoff"] = 1.5
                self.names["handoff"] = "new pyvmm's\nhandoff thread (C)"
        self.y_ram = 0.8
        self.faults = [(f"F{i}", name, self.m[phase]) for i, (name, phase) in
                       enumerate([fp for fp in FAULT_AT.get(mode, []) if fp[1] in self.m], 1)]

    def ms(self, t: int) -> float:
        return (t - self.t0) / 1e6

    def label_lanes(self, ax) -> None:
        lanes = sorted(self.names, key=lambda k: -self.y[k])
        ax.set_yticks([self.y["guest"]] + [self.y[k] for k in lanes] + [self.y_ram])
        ax.set_yticklabels(["guest"] + [self.names[k] for k in lanes] + ["guest RAM"])

    def draw_on(self, ax, x0: float, x1: float) -> None:
        from matplotlib.patches import FancyArrowPatch, Rectangle
        m, y, ms = self.m, self.y, self.ms
        ax.set_xlim(x0, x1)
        ax.set_ylim(-0.3, 5.8)
        ax.spines[["top", "right"]].set_visible(False)
        ax.tick_params(axis="x", labelsize=8)
        wide = x1 - x0
        stop, resume = ms(m["stop"]), ms(self.end)

        # The guest: running until the stop, stopped until the resume (the downtime).
        for a, b, colour in ((x0, stop, RUNNING), (stop, resume, STOPPED), (resume, x1, RUNNING)):
            if b > a:
                ax.add_patch(Rectangle((a, y["guest"] - 0.25), b - a, 0.5, color=colour))
        ax.axvspan(stop, resume, color=STOPPED, alpha=0.07)
        if x0 <= stop and resume <= x1:
            down = self.info.get("x-downtime-us", (self.end - m["stop"]) / 1e3) / 1e3
            what = ("guest stopped {:.2f} ms, then resumed in the old pyvmm"
                    if self.rolled_back else "guest stopped: downtime {:.2f} ms")
            ax.text(min((stop + resume) / 2, x1 - wide * 0.2), y["guest"] + 0.35,
                    what.format(down), ha="center", fontsize=9, color=STOPPED, weight="bold")

        # Phases as boxes on the lane of the process that runs them.
        for i, (phase, t) in enumerate(self.marks):
            end = ms(self.marks[i + 1][1]) if i + 1 < len(self.marks) else x1
            row = y["new"] if phase in ("restore", "resume") else y["old"]
            ax.add_patch(Rectangle((ms(t), row - 0.22), max(end - ms(t), wide * 0.002), 0.44,
                                   color=PHASE_COLOURS.get(phase, "#dddddd"), ec="#555555",
                                   lw=0.4))
            if x0 <= ms(t) < x1 and (end - ms(t)) > wide * 0.06:
                ax.text(ms(t) + wide * 0.005, row, phase, fontsize=7.5, va="center")

        # Finer steps as numbered dots (their text is in the key below).
        for n, (text, t) in enumerate(self.steps, 1):
            if not x0 <= ms(t) <= x1:
                continue
            who = lane(text)
            ax.plot(ms(t), y.get(who, y["old"]), "o", ms=4, zorder=5,
                    color={"old": OLD, "new": NEW}.get(who, SIDE))
            ax.text(ms(t), y.get(who, y["old"]) - 0.3 - 0.22 * (n % 2), str(n), fontsize=6.5,
                    ha="center", va="top")

        if self.exec_mode:
            self._exec_parts(ax, x0, x1)
        # Messages between the processes.
        for label, sent, received, direction in messages(self.info):
            if not (x0 <= ms(sent) <= x1 and x0 <= ms(received) <= x1):
                continue
            a, b = ("old", "new") if direction == "old->new" else ("new", "old")
            if self.exec_mode:
                ax.annotate("", xy=(ms(received), y["new"] + 0.25),
                            xytext=(ms(sent), y["old"] + 0.25),
                            arrowprops=dict(arrowstyle="->", connectionstyle="arc3,rad=-0.3"))
                ax.text((ms(sent) + ms(received)) / 2, y["old"] + 0.55, label, fontsize=7.5,
                        ha="center")
                continue
            ax.add_patch(FancyArrowPatch((ms(sent), y[a]), (ms(received), y[b]),
                                         arrowstyle="->", mutation_scale=11, lw=0.9, zorder=6))
            go = label.startswith("go")
            # (go's label left of its line: it falls near the resume, at the right edge)
            ax.text(ms(received), (y[a] + y[b]) / 2 + (0.25 if go else 0),
                    label + " " if go else " " + label, fontsize=7.5, va="center",
                    ha="right" if go else "left", weight="bold" if go else "normal")
            if go:
                ax.axvline(ms(sent), color="black", ls=":", lw=1)
                ax.text(ms(sent), 0.05, " point of no return", fontsize=7.5, va="bottom")

        # The RAM memfd: one, shared by both processes, never copied.
        ax.add_patch(Rectangle((x0, self.y_ram - 0.2), x1 - x0, 0.4, color="#cfd8dc"))
        if x0 <= ms(self.t0):
            ax.text(x0 + wide * 0.01, self.y_ram, "one memfd, mapped by " +
                    ("the old image and, across execve, the new" if self.exec_mode else
                     "both processes") + ": never copied", va="center", fontsize=7.5)
            tops = [y["old"]] if self.exec_mode else [y["old"], y["new"]]
            for top in tops:
                ax.plot([ms(self.t0)] * 2, [self.y_ram + 0.2, top - 0.22], color="#78909c",
                        lw=1, ls="--")

        # Fault points: each, if armed (--fault NAME), strikes here and rolls back.
        last_x, k = None, 0
        for f, _, t in self.faults:
            if x0 <= ms(t) <= x1:
                # names of points closer than 3 % of the width are stacked, not overprinted
                k = k + 1 if last_x is not None and ms(t) - last_x < wide * 0.03 else 0
                last_x = ms(t)
                ax.plot(ms(t), 4.45, marker="v", ms=5, color="#6d4c41")
                ax.text(ms(t) + wide * 0.004, 4.42 - 0.16 * k, f, fontsize=6.5,
                        color="#6d4c41", va="top")

    def _exec_parts(self, ax, x0, x1) -> None:
        """cpr-exec: the image changes at execve, the prebuilder joins, the holder lives on."""
        m, y, ms, steps = self.m, self.y, self.ms, self.steps
        if "transfer" not in m:   # rolled back before the execve
            return
        t_exec = ms(m["transfer"])
        ax.plot([t_exec] * 2, [y["old"] - 0.35, y["old"] + 0.35], color="black", lw=2)
        ax.text(t_exec, y["old"] - 0.5, "execve" + (" failed" if self.rolled_back else ""),
                fontsize=8, ha="center", va="top")
        if self.rolled_back:   # no new image, no prebuilder; the holder was cancelled
            return
        started = _find(steps, "prebuilder", "started")
        ready = _find(steps, "prebuilder", "ready")
        joined = _find(steps, "joined")
        if started and (ready or joined):
            ax.plot([ms(started), ms(ready or joined)], [y["prebuilder"]] * 2, color=SIDE,
                    lw=3, solid_capstyle="butt")
            ax.text(ms(started), y["prebuilder"] + 0.2, "builds the VM, memory slots, "
                    "vCPUs while Python starts", fontsize=7, color=SIDE)
        running = _find(steps, "prebuilder", "vCPUs running")
        if ready and running:   # the early start: the guest runs before Python took over
            ax.plot([ms(ready), ms(running)], [y["prebuilder"]] * 2, color="#2e7d32", lw=3,
                    solid_capstyle="butt")
            ax.text(ms(running), y["prebuilder"] - 0.25, "restores the vCPU/VM state and "
                    "runs the guest (early start)", fontsize=7, color="#2e7d32", ha="right",
                    va="top")
        if ready and joined:
            ax.annotate("", xy=(ms(joined), y["new"] - 0.22),
                        xytext=(ms(ready), y["prebuilder"]),
                        arrowprops=dict(arrowstyle="->", color=SIDE, ls="--"))
            ax.text(ms(joined), (y["prebuilder"] + y["new"]) / 2, " joined: its VM adopted",
                    fontsize=7, color=SIDE)
        ax.plot([t_exec, ms(self.end)], [y["holder"]] * 2, color="#795548", lw=3,
                solid_capstyle="butt")
        ax.text(t_exec, y["holder"] - 0.3, "keeps the old VM and address space out of "
                "execve; exits once the guest runs\n(not stamped: drawn from execve to "
                "resume)", fontsize=7, color="#795548", va="top")
