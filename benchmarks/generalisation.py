"""Leave-one-corpus-out: a proxy for accuracy on photos from collections a model never saw.

For each prepared corpus in turn, models are trained on the other corpora (their train splits; validation
on their validation splits) and tested on the held-out corpus's test split: the same images as the
in-distribution test figures, so the two can be read side by side. With --score all they are tested on every
image of the held-out corpus instead: no fold model saw any of them, and more images mean a smaller
sampling error (and a test split's make-up, e.g. CelebA's nearly all aligned crops, no longer decides).
One table per kind of model:

- reference: the reference recipe (ResNet18, --weights none here);
- teacher:   a logistic-regression / MLP head on dlib face descriptors (`train --kind descriptor`);
- student:   the fold's reference ResNet18 distilled from the fold's teacher (`train --distill`, lr 3e-4),
             as the shipped student started from the bundled ResNet18;
- ensemble:  the fold's reference ResNet18 and teacher stacked on validation (`train --kind ensemble`).
- probe:     what a new user gets in a few lines: a plain logistic regression (scikit-learn's defaults) on
             the raw descriptors of a random sample of each training corpus, every split (--probe-faces),
             refitted on --probe-draws fresh samples; the mean is reported with its spread. Issue 8's
             yardstick was this probe on 3,000 UTKFace, 3,000 CelebA and 1,500 SCUT-FBP5500 faces.

Every fold's runs are kept under --out; an interrupted benchmark continues where it stopped (finished runs are
reused, a ResNet18 run with a last checkpoint resumes). Usage:

    python benchmarks/generalisation.py --data data/utkface data/celeba data/scut --models teacher
    python benchmarks/generalisation.py --data ... --models reference,student,ensemble --epochs 5 --max-train-images 8000
    python benchmarks/generalisation.py --data ... --models ensemble --hold-out celeba   # one fold only
    python benchmarks/generalisation.py --data ... --models teacher,probe --score all
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression

from facegender.config import load_config
from facegender.data import load_samples, write_manifest
from facegender.evaluate import assess, assess_model
from facegender.heads import labelled_descriptors, train_descriptor_head, train_ensemble
from facegender.inference import Classifier
from facegender.io import write_text
from facegender.train import train

MODELS = ("reference", "teacher", "student", "ensemble", "probe")
STUDENT_LR = 3e-4  # the shipped student's: it starts from a trained network (MODEL_CARD.md)
PROBE_FACES = "utkface=3000,celeba=3000,scut_fbp5500=1500,*=3000"  # issue 8's probe; * for any other corpus


def fold_data(held_out: str, datasets: dict[str, list], folder: Path) -> Path:
    """A manifest of every other corpus, all splits: what the fold's models train and validate on."""
    manifest = folder / "data" / "manifest.csv"
    if not manifest.is_file():
        write_manifest([s for name, samples in datasets.items() if name != held_out for s in samples], manifest)
    return manifest


def fit(kind: str, run: Path, manifest: Path, args, teacher: Path, reference: Path) -> None:
    """Train one fold's model into ``run`` unless it is there already."""
    if (run / "best.safetensors").is_file() and (kind in ("teacher", "ensemble") or (run / "metrics.json").is_file()):
        return
    quiet = contextlib.redirect_stdout(io.StringIO()) if not args.verbose else contextlib.nullcontext()
    config = load_config(args.config, weights=args.weights, epochs=args.epochs, max_train_images=args.max_train_images)
    with quiet:
        if kind == "teacher":
            train_descriptor_head(config, [str(manifest)], run)
        elif kind == "ensemble":
            train_ensemble(config, [str(manifest)], run, [str(reference), str(teacher)])
        else:
            if kind == "student":
                config.distill, config.weights, config.lr = str(teacher), str(reference / "best.safetensors"), STUDENT_LR
            resume = (run / "last.safetensors").is_file()
            train(None if resume else config, [str(manifest)], run, resume=resume)


def score(run: Path, samples: list) -> dict:
    clf = Classifier.from_checkpoint(run, detect=False)
    return assess_model(clf.model, samples, clf.threshold, clf.temperature)[0]


def probe_faces(spec: str) -> dict[str, int]:
    """``"utkface=3000,*=2000"`` -> faces to draw per corpus ("*": any corpus not named)."""
    try:
        pairs = [item.split("=") for item in spec.split(",") if item.strip()]
        sizes = {name.strip(): int(n) for name, n in pairs}
    except ValueError:
        raise SystemExit(f"--probe-faces {spec!r}: give CORPUS=N pairs separated by commas, e.g. utkface=3000,*=3000")
    if any(n < 2 for n in sizes.values()):
        raise SystemExit(f"--probe-faces {spec!r}: each corpus needs at least 2 faces")
    return sizes


def score_probe(datasets: dict[str, list], held_out: str, tested: list, sizes: dict[str, int], draws: int) -> dict:
    """Fit the probe on ``draws`` random samples of the other corpora and score each fit on ``tested``.

    The accuracy is the mean over draws (with its spread); the other figures are the median draw's."""
    pools = {name: labelled_descriptors(samples)[:2] for name, samples in datasets.items() if name != held_out}
    x_test, y_test, kept, _, _ = labelled_descriptors(tested)
    rng = np.random.default_rng(0)
    runs = []
    for _ in range(draws):
        picks = [(x, y, rng.choice(len(y), min(len(y), sizes.get(name, sizes.get("*", 3000))), replace=False))
                 for name, (x, y) in pools.items()]
        x = np.concatenate([x[i] for x, _, i in picks])
        y = np.concatenate([y[i] for _, y, i in picks])
        logits = LogisticRegression(max_iter=3000).fit(x, y).decision_function(x_test)
        runs.append(assess(logits, y_test, [tested[i] for i in kept], 0.5, 1.0))
    accuracies = [m["accuracy"] for m in runs]
    middle = runs[int(np.argsort(accuracies)[len(runs) // 2])]  # the median draw's table row
    return middle | {"accuracy": float(np.mean(accuracies)), "accuracy_sd": float(np.std(accuracies)),
                     "draws": draws, "train_faces": int(sum(len(i) for *_, i in picks))}


def row(name: str, m: dict) -> str:
    recall = {c: m["per_class"][c]["recall"] for c in ("female", "male")}
    kids = m.get("groups", {}).get("age_group", {}).get("groups", {}).get("0-9", {}).get("accuracy")
    kids = "     -" if kids is None else f"{kids * 100:6.2f}"
    spread = f"  sd {m['accuracy_sd'] * 100:.2f} over {m['draws']} draws" if "accuracy_sd" in m else ""
    return (f"{name:<13} {m['count']:>6} {m['accuracy'] * 100:8.2f} {m['roc_auc']:7.4f} {recall['female'] * 100:8.2f} "
            f"{recall['male'] * 100:8.2f} {kids}{spread}")


def summarised(m: dict) -> dict:
    return {"accuracy": m["accuracy"], "roc_auc": m["roc_auc"], "count": m["count"],
            "recall": {c: m["per_class"][c]["recall"] for c in ("female", "male")},
            "age_0_9": m.get("groups", {}).get("age_group", {}).get("groups", {}).get("0-9", {}).get("accuracy"),
            **{k: m[k] for k in ("accuracy_sd", "draws", "train_faces") if k in m}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", required=True, help="prepared corpora (at least two)")
    parser.add_argument("--models", default="teacher", help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--out", default="runs/generalisation")
    parser.add_argument("--config", help="YAML config for the ResNet18 runs (default: the reference recipe)")
    parser.add_argument("--weights", default="none", help="ResNet18 initialisation (none here; imagenet where available)")
    parser.add_argument("--epochs", type=int, help="ResNet18 epochs (default: the recipe's 20)")
    parser.add_argument("--max-train-images", type=int, help="cap on each fold's ResNet18 training images")
    parser.add_argument("--hold-out", nargs="+", help="only these folds: the corpora (by source name) to hold out")
    parser.add_argument("--score", choices=("test", "all"), default="test",
                        help="test the held-out corpus's test split (default) or every one of its images")
    parser.add_argument("--probe-faces", default=PROBE_FACES, help=f"probe sample per corpus (default {PROBE_FACES})")
    parser.add_argument("--probe-draws", type=int, default=10, help="probe refits on fresh samples (default 10)")
    parser.add_argument("--verbose", action="store_true", help="show the training output")
    args = parser.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown or len(args.data) < 2:
        parser.error(f"unknown model(s) {unknown}" if unknown else "give at least two corpora")
    if args.probe_draws < 1:
        parser.error(f"--probe-draws {args.probe_draws}: give 1 or more")
    sizes = probe_faces(args.probe_faces)
    needs = {"student": ["reference", "teacher"], "ensemble": ["reference", "teacher"]}
    order = [m for m in MODELS if m in models or any(m in needs.get(x, []) for x in models)]

    datasets = {}
    for d in args.data:
        samples = load_samples(d, None)
        datasets[samples[0].source or Path(d).name] = samples
    out = Path(args.out)
    results: dict[str, dict[str, dict]] = {m: {} for m in order}
    folds = args.hold_out or list(datasets)
    if set(folds) - set(datasets):
        parser.error(f"--hold-out {' '.join(sorted(set(folds) - set(datasets)))}: not among {', '.join(datasets)}")
    for held_out in folds:
        samples = datasets[held_out]
        folder = out / f"without-{held_out}"
        manifest = fold_data(held_out, datasets, folder)
        tested = samples if args.score == "all" else [s for s in samples if s.split == "test"]
        for kind in order:
            print(f"[{held_out}] {kind} ...", flush=True)
            if kind == "probe":
                results[kind][held_out] = score_probe(datasets, held_out, tested, sizes, args.probe_draws)
                continue
            run = folder / kind
            fit(kind, run, manifest, args, folder / "teacher", folder / "reference")
            results[kind][held_out] = score(run, tested)
    # earlier runs' folds and models are kept beside this run's; each --score has its own file
    path = out / ("summary.json" if args.score == "test" else "summary-all.json")
    summary = json.loads(path.read_text()) if path.is_file() else {}
    scored = "its test split" if args.score == "test" else "all its images"
    for kind in models:
        print(f"\n{kind}: trained without the held-out corpus, tested on {scored}")
        print(f"{'held out':<13} {'images':>6} {'accuracy':>8} {'AUC':>7} {'recall F':>8} {'recall M':>8} {'0-9':>6}")
        for held_out, m in results[kind].items():
            print(row(held_out, m))
        mean = float(np.mean([m["accuracy"] for m in results[kind].values()]))
        print(f"{'mean':<13} {'':>6} {mean * 100:8.2f}")
        summary.setdefault(kind, {}).update({h: summarised(m) for h, m in results[kind].items()})
    write_text(path, json.dumps(summary, indent=2) + "\n")
    print(f"\nsummary: {path}")


if __name__ == "__main__":
    main()
