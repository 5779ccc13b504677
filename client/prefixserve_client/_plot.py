"""Loss curves at a terminal (a sparkline) and as an image (matplotlib, the optional `[plot]` extra)."""

from __future__ import annotations

from pathlib import Path

from ._models import JobState

BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 30) -> str:
    """`values` drawn in at most `width` block characters (each the mean of its share of the values),
    scaled from their minimum (▁) to their maximum (█)."""
    if not values:
        return ""
    n = min(width, len(values))
    means = []
    for i in range(n):  # bucket i covers values[lo:hi]
        lo, hi = i * len(values) // n, (i + 1) * len(values) // n
        means.append(sum(values[lo:hi]) / (hi - lo))
    low, high = min(means), max(means)
    if high == low:
        return BARS[len(BARS) // 2] * n
    return "".join(BARS[round((m - low) / (high - low) * (len(BARS) - 1))] for m in means)


def plot_losses(state: JobState, path: str | Path) -> Path:
    """Write the job's loss curve (train per step, validation per epoch) to an image file (PNG, SVG,
    PDF: by the suffix). Needs matplotlib: pip install 'prefixserve-client[plot]'."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no window
        from matplotlib import pyplot as plt
    except ImportError as exc:
        raise RuntimeError("plotting needs matplotlib: pip install 'prefixserve-client[plot]'") from exc
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=120)
    try:
        steps = range(1, len(state.losses) + 1)
        ax.plot(steps, state.losses, label="train (per step)", linewidth=1.2)
        if state.eval_losses:
            epochs = state.config.get("epochs") or len(state.eval_losses)
            per_epoch = (state.total_steps or len(state.losses)) / epochs
            xs = [(i + 1) * per_epoch for i in range(len(state.eval_losses))]
            ax.plot(xs, state.eval_losses, "o--", label="validation (per epoch)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.set_title(f"{state.name or state.id}: {state.status}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return Path(path)
