r"""A picture of the three views: stacked bars, one group per method (matplotlib)."""

from __future__ import annotations

from .presets import CATEGORIES, LABELS, MiB

# ---------------------------------------------------------------------------
# A picture: stacked bars, one group per method
# ---------------------------------------------------------------------------

COLORS = {
    "weights_frozen": "#9db4c0", "weights_trainable": "#2b6f97", "gradients": "#e07a5f",
    "optimizer": "#f2cc8f", "bookkeeping": "#8d6a9f", "batch": "#cccccc",
    "activations": "#3d9970", "temporaries": "#d4a373", "other": "#81b29a",
}


def plot(reports, path: str) -> str:
    """Stacked bars of each report's three views at their peaks, saved as a PNG at ``path``.

    The estimated and accounted bars are split by category (the estimate at
    the moment it assumes for its peak, the books at the moment of theirs);
    the measured bar into the arrays alive at the start and what the step
    added up to its peak (arrays and Python objects). Needs matplotlib
    (imported only here).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    reports = list(reports)
    fig = Figure(figsize=(3.0 + 1.6 * len(reports), 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    short = {**LABELS, "activations": "activations (saved)", "other": "other live arrays"}
    width, step, x, ticks, labels = 0.22, 0.26, 0.0, [], []
    used = set()
    for r in reports:
        e = r.estimated
        bars = []
        # The estimate's bar shows the moment its peak assumes: activations and
        # other live arrays (forward's end) or the gradients (backward's end),
        # whichever is larger; no optimizer state on a first step.
        if e is not None:
            at_peak = dict(e.bytes)
            if e.bytes["activations"] + e.bytes["other"] >= e.bytes["gradients"]:
                at_peak["gradients"] = 0
            else:
                at_peak["activations"] = at_peak["other"] = 0
            if e.first_step:
                at_peak["optimizer"] = 0
            bars.append(("est.", at_peak))
        bars.append(("acc.", r.peak_breakdown))
        for k, (name, cats) in enumerate(bars):
            bottom = 0.0
            for cat in CATEGORIES:
                h = cats.get(cat, 0) / MiB
                if h:
                    ax.bar(x + k * step, h, width, bottom=bottom, color=COLORS[cat],
                           label=None if cat in used else short[cat])
                    used.add(cat)
                    bottom += h
            ticks.append(x + k * step)
            labels.append(f"{r.method}\n{name}")
        # The measured bar has no categories, only what the allocator knows:
        # arrays and Python objects at the start, and what the step added.
        k = len(bars)
        start_arrays, start_total = r.phases_measured["start"]
        parts = [("measured: arrays at the start", start_arrays, "#555555"),
                 ("measured: Python objects at the start", start_total - start_arrays, "#999999"),
                 ("measured: added up to the peak", r.measured_peak - start_total, "#bbbbbb")]
        bottom = 0.0
        for name, h, color in parts:
            ax.bar(x + k * step, h / MiB, width, bottom=bottom, color=color, hatch="//",
                   label=None if name in used else name)
            used.add(name)
            bottom += h / MiB
        ticks.append(x + k * step)
        labels.append(f"{r.method}\nmeas.")
        x += (k + 1) * step + 0.3
    ax.set_xticks(ticks)
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("MiB at the peak of one training step")
    r0 = reports[0]
    ax.set_title(f"GPT {r0.config.n_layer}x{r0.config.n_embd}, batch {r0.batch_size} x {r0.seq_len}: "
                 "estimated, accounted, measured", fontsize=9)
    handles, names = ax.get_legend_handles_labels()
    order = [short[c] for c in CATEGORIES] + [p[0] for p in parts]
    pairs = sorted(zip(handles, names), key=lambda hn: order.index(hn[1]))
    ax.legend([h for h, _ in pairs], [n for _, n in pairs], fontsize=6, loc="upper left",
              bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


