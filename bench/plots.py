"""PNG plots of the reasoning-tax benchmark (matplotlib, Agg: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

FIXED = "fixed-"


def plot_tax(res: dict[str, Any], out_dir: Path) -> list[Path]:
    """accuracy vs mean tokens (a point per policy) and accuracy vs rounds (the fixed-k curve, other
    policies as points); returns the files written."""
    import matplotlib

    matplotlib.use("Agg")  # before pyplot: headless machines, no display
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    pol = res["policies"]
    fixed = sorted((int(k[len(FIXED) :]), m) for k, m in pol.items() if k.startswith(FIXED))
    others = {k: m for k, m in pol.items() if not k.startswith(FIXED)}
    title = f"{res['model']}, {res['n']} problems ({res['suite']})"
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, m in pol.items():
        ax.scatter(m["mean_tokens"], m["accuracy"], marker="o" if name.startswith(FIXED) else "s")
        ax.annotate(
            name, (m["mean_tokens"], m["accuracy"]), textcoords="offset points", xytext=(4, 4), fontsize=8
        )
    ax.set(
        xlabel="mean completion tokens per request", ylabel="accuracy", title=f"Accuracy vs tokens: {title}"
    )
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out_dir / "tax_accuracy_vs_tokens.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([k for k, _ in fixed], [m["accuracy"] for _, m in fixed], "o-", label="fixed k rounds")
    for name, m in others.items():
        ax.scatter(m["mean_rounds"], m["accuracy"], marker="s", label=name, zorder=3)
    ax.set(
        xlabel="rounds (mean for adaptive policies)", ylabel="accuracy", title=f"Accuracy vs rounds: {title}"
    )
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(_save(fig, out_dir / "tax_accuracy_vs_rounds.png"))
    return paths


def plot_thinking_tax(res: dict[str, Any], out_dir: Path) -> Path:
    """Thinking mode: accuracy vs mean tokens, the fixed budgets as a curve, exits as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    pol = res["policies"]
    budgets = sorted((int(k.split("-")[1]), m) for k, m in pol.items() if k.startswith("budget-"))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(
        [m["mean_tokens"] for _, m in budgets],
        [m["accuracy"] for _, m in budgets],
        "o-",
        label=f"fixed budget (segments of {res['segment_tokens']} tokens)",
    )
    for k, m in budgets:
        ax.annotate(
            f"{k}", (m["mean_tokens"], m["accuracy"]), textcoords="offset points", xytext=(4, -10), fontsize=8
        )
    for name, m in pol.items():
        if not name.startswith("budget-"):
            ax.scatter(m["mean_tokens"], m["accuracy"], marker="s", label=name, zorder=3)
    title = f"{res['model']}, {res['n']} problems ({res['suite']})"
    ax.set(xlabel="mean completion tokens per request (trace + probes + answer)", ylabel="accuracy")
    ax.set_title(f"Thinking mode, accuracy vs tokens: {title}", fontsize=9)
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out_dir / "tax_thinking_accuracy_vs_tokens.png")


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
