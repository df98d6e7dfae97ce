"""PNG curves of a training run (needs matplotlib: the ``plot`` extra)."""

from __future__ import annotations

import os


def plot_history(history: list[dict], out_dir: str, chance: float | None = None) -> list[str]:
    """Write loss.png and accuracy.png (per step, curriculum lengths marked); returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    changes = [(r["step"], r["seq_len"]) for i, r in enumerate(history) if i == 0 or r["seq_len"] != history[i - 1]["seq_len"]]
    paths = []
    for key, label in (("loss", "training loss"), ("accuracy", "training-batch accuracy")):
        fig, ax = plt.subplots(figsize=(8, 4.5))
        ax.plot(steps, [r[key] for r in history], lw=1)
        if key == "loss":
            ax.set_yscale("log")
        if key == "accuracy" and chance is not None:
            ax.axhline(chance, color="grey", ls="--", lw=1, label=f"chance ({chance:.2f})")
            ax.legend(loc="lower right")
        for step, seq_len in changes:
            ax.axvline(step, color="tab:orange", lw=0.6, alpha=0.6)
            ax.text(step, 1.0, f" N={seq_len}", transform=ax.get_xaxis_transform(), fontsize=7, va="top", rotation=90)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        path = os.path.join(out_dir, f"{key}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
