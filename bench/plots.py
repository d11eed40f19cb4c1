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


def plot_policy_frontier(res: dict[str, Any], out_dir: Path) -> Path:
    """`bench policy`: per format, every policy a point (mean tokens, accuracy with its 95% interval);
    the cheapest-for-its-accuracy points joined as the frontier; the default marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    formats = list(res["analysis"].items())
    fig, axes = plt.subplots(1, len(formats), figsize=(6 * len(formats), 4.5), squeeze=False)
    for ax, (fmt, a) in zip(axes[0], formats, strict=True):
        pts = {k: (m["mean_tokens"], m["accuracy"]) for k, m in a["policies"].items()}
        groups: dict[tuple[float, float], list[str]] = {}  # policies that coincide share a point
        for name, (tok, acc) in pts.items():
            groups.setdefault((tok, acc["value"]), []).append(name)
        for i, ((tok, value), names) in enumerate(sorted(groups.items())):
            acc = pts[names[0]][1]
            err = [[value - acc["lo"]], [acc["hi"] - value]]
            style = {"fmt": "s", "color": "C3"} if "default" in names else {"fmt": "o", "color": "C0"}
            ax.errorbar(tok, value, yerr=err, capsize=3, zorder=3, **style)
            label = " = ".join(sorted(names, key=lambda n: n != "default"))
            # neighbours' labels alternate above and below their points
            ax.annotate(
                label, (tok, value), textcoords="offset points", xytext=(5, 4 - 14 * (i % 2)), fontsize=8
            )
        bound = res["token_bound"] * a["policies"]["fixed-4"]["mean_tokens"]
        ax.axvline(bound, color="C2", ls=":", label=f"{res['token_bound']:.0%} of fixed-4's tokens")
        frontier, best = [], -1.0
        for tok, acc in sorted(pts.values(), key=lambda p: (p[0], -p[1]["value"])):
            if acc["value"] > best:
                frontier.append((tok, acc["value"]))
                best = acc["value"]
        ax.plot(*zip(*frontier, strict=True), "--", color="grey", alpha=0.6, label="frontier")
        v = a["verdict"]["difference"]
        ax.set_title(
            f"{fmt}, n={a['n']}: default - {a['best_fixed']} = {v['value']:+.3f} "
            f"[{v['lo']:+.3f}, {v['hi']:+.3f}]",
            fontsize=9,
        )
        ax.set(xlabel="mean completion tokens per request", ylabel="accuracy (95% Wilson interval)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{res['model']}: {res['suite']} problems, every policy a point", fontsize=10)
    return _save(fig, out_dir / f"policy_frontier_{res['suite']}.png")


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
