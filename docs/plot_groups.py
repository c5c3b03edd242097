"""Draw accuracy per age group and per race group from the metrics.json of `facegender evaluate` runs.

    python docs/plot_groups.py descriptor=docs/results/groups/descriptor.json \
        resnet18=docs/results/groups/resnet18.json --out docs/results/groups/accuracy_by_group.png

Each NAME=METRICS.json is one model's bars; the number of test images of each group is printed under it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

GROUPINGS = (("age_group", "age group (UTKFace)"), ("race", "race group (UTKFace, SCUT-FBP5500)"))


def named_metrics(text: str) -> tuple[str, dict]:
    name, sep, path = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=METRICS.json")
    return name, json.loads(Path(path).read_text(encoding="utf-8"))


def plot(models: list[tuple[str, dict]], out: Path) -> None:
    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, len(GROUPINGS), gridspec_kw={"width_ratios": [5, 6]})
    width = 0.8 / len(models)
    for ax, (grouping, title) in zip(axes, GROUPINGS):
        groups = models[0][1]["groups"][grouping]["groups"]
        names = list(groups)
        x = np.arange(len(names))
        for i, (model, metrics) in enumerate(models):
            acc = [metrics["groups"][grouping]["groups"][g]["accuracy"] * 100 for g in names]
            bars = ax.bar(x + (i - (len(models) - 1) / 2) * width, acc, width, label=model)
            ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
        ax.set_xticks(x, [f"{g}\n{groups[g]['count']:,}" for g in names])
        ax.set_ylim(50, 102)
        ax.set_ylabel("accuracy, %")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(loc="upper left")
    fig.suptitle("Accuracy by group, test split (images per group under each name)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=named_metrics, metavar="NAME=METRICS.json")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args()
    plot(args.models, args.out)
    print(args.out)


if __name__ == "__main__":
    main()
