"""The similarity histogram of the report (matplotlib, written as a PNG)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402


def similarity_histogram_png(histogram: dict[str, int], threshold: float, path: str,
                             bin_width: float = 0.01, xlabel: str | None = None) -> None:
    """Bars of candidate-pair counts per similarity bin, the threshold as a vertical line.

    ``histogram`` maps a bin's lower edge (as text, e.g. "0.87") to its count. The y axis is
    logarithmic: near-duplicates are a thin tail next to the bulk of unrelated neighbours.
    """
    edges = sorted((float(k), v) for k, v in histogram.items())
    fig, ax = plt.subplots(figsize=(8, 3.2), dpi=100)
    try:
        if edges:
            xs, ys = zip(*edges)
            colours = ["#c0392b" if x + bin_width / 2 >= threshold else "#7f8c8d" for x in xs]
            ax.bar(xs, ys, width=bin_width, align="edge", color=colours)
            ax.set_yscale("log")
            lo = min(min(xs), threshold - 0.05)
            ax.set_xlim(max(-1.0, lo), min(1.0, max(max(xs) + bin_width, threshold + 0.02)))
        ax.axvline(threshold, color="#2c3e50", linestyle="--", linewidth=1.5)
        ax.annotate(f"threshold {threshold:.3f}", xy=(threshold, 1), xycoords=("data", "axes fraction"),
                    xytext=(-4, -12), textcoords="offset points", ha="right", fontsize=9)
        ax.set_xlabel(xlabel or "similarity of candidate pairs (each image's nearest neighbours)")
        ax.set_ylabel("pairs (log scale)")
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
