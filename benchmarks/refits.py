"""Heads refitted on a variant's own descriptors, scored as a default model is chosen (shared by the studies
of cheaper descriptors: ``int8_network.py --refit``, ``chip_size.py``).

A variant's descriptors per split, ``{"train" | "val" | "test": (descriptors, labels, corpus names)}``, get
heads fitted as ``train --kind descriptor`` fits them (its rule: a logistic regression, or an MLP of seed 0
where clearly better on validation) and as the mean of ``SEEDS`` MLPs (seeds 0-4: one MLP five times as
wide), each scored per corpus on the validation split (where a choice is made), the test split and
leave-one-corpus-out (fitted on two corpora's training and validation splits, scored on every image of the
third); the bundled head, unchanged, beside them.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

SEEDS = 5  # MLPs averaged by the second recipe
Split = tuple[np.ndarray, np.ndarray, np.ndarray]  # descriptors, labels, corpus of each


def fitted(x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray) -> dict[str, Callable]:
    """recipe -> logits function, both recipes fitted on (x, y) and chosen on (x_val, y_val)."""
    from facegender.heads import fit_logistic, fit_mlp, kept_head  # PyTorch and scikit-learn

    quiet = lambda *_: None
    mlps = [fit_mlp(x, y, x_val, y_val, seed, log=quiet) for seed in range(SEEDS)]
    rule, _ = kept_head(fit_logistic(x, y, x_val, y_val, quiet), mlps[0], x_val, y_val)
    return {"train's rule": rule.logits,
            f"mean of {SEEDS} MLPs": lambda x: np.mean([m.logits(x) for m in mlps], axis=0)}


def header(corpora: list[str]) -> None:
    print(f"\nheads refitted on each variant's descriptors: accuracy per corpus ({', '.join(corpora)}); "
          "validation chooses, test and leave-one-corpus-out report")
    print(f"{'':52s} {'validation':>22s}   {'test':>22s}   {'leave-one-corpus-out':>22s}")


def refit_rows(name: str, got: dict[str, Split], bundled: Callable) -> None:
    """Print the bundled head's row and both recipes' rows for one variant's descriptors."""
    corpora = sorted(set(got["test"][2]))
    per = lambda z, y, src: " ".join(f"{100 * ((z[src == c] > 0) == y[src == c]).mean():6.2f}" for c in corpora)
    (x, y, _), (xv, yv, _) = got["train"], got["val"]
    folds: dict[str, list[float]] = {}
    for held in corpora:
        t, v = got["train"][2] != held, got["val"][2] != held
        heads = fitted(x[t], y[t], xv[v], yv[v])
        out = [np.concatenate([a[i][a[2] == held] for a in got.values()]) for i in (0, 1)]
        for recipe, logits in heads.items():
            folds.setdefault(recipe, []).append(100 * ((logits(out[0]) > 0) == out[1]).mean())
    rows = {"bundled head": bundled, **fitted(x, y, xv, yv)}
    for recipe, logits in rows.items():
        loco = " ".join(f"{a:6.2f}" for a in folds[recipe]) if recipe in folds else ""
        print(f"{name + ', ' + recipe:52s} {per(logits(got['val'][0]), *got['val'][1:]):>22s}   "
              f"{per(logits(got['test'][0]), *got['test'][1:]):>22s}   {loco:>22s}", flush=True)
