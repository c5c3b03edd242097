"""Datasets: turn each corpus layout into one manifest CSV with deterministic, group-safe splits."""
from __future__ import annotations

import csv
import functools
import hashlib
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence

from .config import CLASSES
from .detect import DEFAULT_DETECTOR
from .images import BadImage, check_image, open_rgb, parallel_map
from .io import UserError, atomic_open

MANIFEST = "manifest.csv"
DROPPED = "dropped.csv"
FIELDS = ("path", "label", "split", "source", "identity", "age", "race", "sha1", "box", "landmarks")
SPLITS = ("train", "val", "test")
SPLIT_WEIGHTS = {"train": 4, "val": 1, "test": 1}
SPLIT_DIRS = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
UTK_RACES = ("white", "black", "asian", "indian", "others")
UTK_BAD_BATCH = "21_0_4_20161223"  # documented: many of these "male" pictures are women or children
LABEL_WORDS = {"female": 0, "f": 0, "woman": 0, "male": 1, "m": 1, "man": 1}
CSV_COLUMNS = {
    "path": ("file", "path", "image", "filename"),
    "label": ("gender", "label", "sex"),
    "identity": ("identity", "person_id", "person"),  # not "id": often a row number
    "age": ("age",),
    "race": ("race",),
}


@dataclass(frozen=True)
class Sample:
    path: str
    label: int  # index into CLASSES
    split: str
    source: str
    identity: str = ""
    age: int | None = None
    race: str = ""
    sha1: str = ""
    box: tuple[int, int, int, int] | None = None  # the canonical face crop; None = the whole image
    landmarks: tuple[float, ...] | None = None  # the face's 5 landmarks, x0 y0 ... x4 y4 (they place the descriptor chip)


@dataclass
class PrepareReport:
    source: str
    manifest: Path
    counts: dict[str, dict[str, int]]  # split -> class name -> images
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    undetected: int | None = None  # images where no face was found (kept whole); None: detection was off

    def dropped_by_reason(self) -> Counter:
        return Counter(reason for _, reason in self.dropped)

    @property
    def total(self) -> int:
        return sum(sum(row.values()) for row in self.counts.values())

    def summary(self) -> str:
        lines = [f"{self.source}: {self.total} images -> {self.manifest}", _table(self.counts)]
        if self.dropped:
            lines.append(f"dropped {len(self.dropped)}:")
            lines += [f"  {n:>6}  {reason}" for reason, n in self.dropped_by_reason().most_common()]
        else:
            lines.append("dropped 0")
        if self.undetected is None:
            lines.append("faces: not detected (--no-detect); whole images are used")
        else:
            lines.append(f"faces: found in {self.total - self.undetected}; no face in {self.undetected} "
                         "(those are used whole)")
        return "\n".join(lines)


# ---------------------------------------------------------------- preparers


def prepare_utkface(src, out, seed: int = 0, workers: int = 2, detect: bool = True,
                    detector: str = DEFAULT_DETECTOR) -> PrepareReport:
    """UTKFace: labels in names ``AGE_GENDER_RACE_DATETIME.jpg.chip.jpg``, gender 0 = male, 1 = female."""
    src = _existing_dir(src)
    samples, dropped, distrusted = [], [], {}
    for path in _image_files(src):
        if path.name.startswith(UTK_BAD_BATCH):
            distrusted[str(path)] = "known mislabelled batch"
        fields = path.name.split(".")[0].split("_")
        # Three names in the release lack the race field: AGE_GENDER_DATETIME.
        if len(fields) == 3 and len(fields[2]) >= 8:
            fields.insert(2, "")
        if (
            len(fields) != 4
            or not fields[0].isdigit()
            or fields[1] not in ("0", "1")
            or fields[2] not in ("", *map(str, range(len(UTK_RACES))))
        ):
            dropped.append((str(path), "unparseable file name"))
            continue
        samples.append(
            Sample(
                path=str(path),
                label=1 - int(fields[1]),
                split="",
                source="utkface",
                age=int(fields[0]),
                race=UTK_RACES[int(fields[2])] if fields[2] else "",
            )
        )
    return _finish(samples, dropped, out, seed, workers, detect, "utkface", distrusted, detector)


def prepare_celeba(src, out, seed: int = 0, workers: int = 2, detect: bool = True,
                   detector: str = DEFAULT_DETECTOR) -> PrepareReport:
    """CelebA: ``list_attr_celeba.txt`` (gender = the ``Male`` column) and optional ``identity_CelebA.txt``."""
    src = _existing_dir(src).resolve()
    attr_file = src / "list_attr_celeba.txt"
    if not attr_file.is_file():
        raise UserError(f"{src}: no list_attr_celeba.txt; expected CelebA's attribute list beside img/")
    image_dir = src / "img" if (src / "img").is_dir() else src
    identities = _read_celeba_identities(src / "identity_CelebA.txt")
    samples = []
    for name, male in _read_celeba_male(attr_file):
        path = image_dir / name
        if path.is_file():  # the attribute list may cover the full corpus; this folder may hold a subset
            samples.append(Sample(str(path), int(male), "", "celeba", identities.get(name, "")))
    if not samples:
        raise UserError(f"{image_dir}: none of the files listed in {attr_file.name} are here")
    return _finish(samples, [], out, seed, workers, detect, "celeba", detector=detector)


def prepare_csv(labels_csv, out, image_root=None, seed: int = 0, workers: int = 2, detect: bool = True,
                detector: str = DEFAULT_DETECTOR) -> PrepareReport:
    """A CSV of file + gender (+ optional identity, age, race); relative paths resolve against
    ``image_root``, else the first of the CSV's folder, its ``img/`` and its ``images/`` that holds them."""
    labels_csv = Path(labels_csv).resolve()
    if not labels_csv.is_file():
        raise UserError(f"{labels_csv}: labels CSV not found")
    source = labels_csv.parent.name
    roots = [Path(image_root).resolve()] if image_root is not None else [
        labels_csv.parent / d for d in ("", "img", "images")
    ]
    rows, columns = _read_labels_csv(labels_csv)
    samples, dropped = [], []
    for line, row in rows:
        name = _cell(row, columns["path"])
        label = _parse_label(_cell(row, columns["label"]), labels_csv, line, columns["label"])
        path = next((r / name for r in roots if (r / name).is_file()), roots[0] / name)
        if not name:
            dropped.append((f"{labels_csv}:{line}", "no file name"))
        elif label is None:
            dropped.append((str(path), "no gender label"))
        elif not path.is_file():
            dropped.append((str(path), "file not found"))
        else:
            samples.append(
                Sample(
                    path=str(path),
                    label=label,
                    split="",
                    source=source,
                    identity=_cell(row, columns.get("identity")),
                    age=_parse_age(_cell(row, columns.get("age"))),
                    race=_cell(row, columns.get("race")).lower(),
                )
            )
    return _finish(samples, dropped, out, seed, workers, detect, source, detector=detector)


def prepare_folder(src, out, seed: int = 0, workers: int = 2, detect: bool = True,
                   detector: str = DEFAULT_DETECTOR) -> PrepareReport:
    """A folder of class folders, ``female/`` and ``male/`` (any case), to be split."""
    src = _existing_dir(src).resolve()
    class_dirs = _class_dirs(src)
    if not class_dirs:
        raise UserError(f"{src}: expected class folders {' and '.join(CLASSES)}/ holding images")
    samples = [
        Sample(str(path), label, "", src.name)
        for label, folder in class_dirs
        for path in _image_files(folder)
    ]
    return _finish(samples, [], out, seed, workers, detect, src.name, detector=detector)


# ---------------------------------------------------------------- shared preparation mechanics


def _finish(
    samples: list[Sample], dropped: list, out, seed: int, workers: int, detect: bool, source: str,
    distrusted: dict | None = None, detector: str = DEFAULT_DETECTOR,
) -> PrepareReport:
    """Check files, drop doubtful labels, collapse duplicates, split, and write the manifest.

    ``distrusted`` maps paths known to be mislabelled to the reason; they still take part in the duplicate
    check, so a copy of one elsewhere under another label is not trusted either.
    """
    distrusted = distrusted or {}
    if not samples:
        raise UserError(f"{source}: no usable images found")
    checks = parallel_map(_check_file, [s.path for s in samples], workers)
    hashed = []
    for sample, (sha1, reason) in zip(samples, checks):
        if reason:
            dropped.append((sample.path, reason))
        else:
            hashed.append(replace(sample, sha1=sha1))
    trusted = []
    for s in _drop_label_conflicts(hashed, dropped):
        if s.path in distrusted:
            dropped.append((s.path, distrusted[s.path]))
        else:
            trusted.append(s)
    kept = _drop_identity_outliers(_collapse_duplicates(trusted, dropped), dropped)
    if not kept:
        reasons = ", ".join(f"{n} {r}" for r, n in Counter(r for _, r in dropped).most_common())
        raise UserError(f"{source}: no usable images; all were dropped ({reasons})")
    final = sorted(_assign_splits(kept, seed), key=lambda s: s.path)
    undetected = None
    if detect:
        found = parallel_map(functools.partial(_face_box, detector=detector), [s.path for s in final], workers)
        final = [replace(s, box=box, landmarks=points) for s, (box, points) in zip(final, found)]
        undetected = sum(box is None for box, _ in found)
    out = Path(out)
    write_manifest(final, out / MANIFEST)
    with atomic_open(out / DROPPED, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(("path", "reason"))
        writer.writerows(sorted(dropped))
    return PrepareReport(source, out / MANIFEST, _counts(final), sorted(dropped), undetected)


_DETECTORS: dict = {}  # one of each kind per process: parallel_map's workers each build their own on first use


def _face_box(path: str, detector: str = DEFAULT_DETECTOR) -> tuple[tuple[int, int, int, int] | None, tuple[float, ...] | None]:
    """The canonical crop and the 5 landmarks of the largest face; (None, None) (train on the whole image)
    when none is found."""
    from .detect import FaceDetector, detect_faces

    if detector not in _DETECTORS:
        _DETECTORS[detector] = FaceDetector(detector)
    found = detect_faces(open_rgb(path), _DETECTORS[detector])
    if not found:
        return None, None
    face, box = found[0]
    points = None if face.points is None else tuple(round(v, 1) for p in face.points for v in p)
    return box, points


def _check_file(path: str) -> tuple[str, str]:
    """(sha1, "") for a decodable file, ("", reason) otherwise. Runs in worker processes."""
    try:
        data = Path(path).read_bytes()
        check_image(data, path)
    except OSError as e:
        return "", f"unreadable ({e.strerror})"
    except BadImage as e:
        return "", e.reason
    return hashlib.sha1(data).hexdigest(), ""


def _duplicate_groups(samples: list[Sample]) -> list[list[Sample]]:
    groups: dict[str, list[Sample]] = defaultdict(list)
    for s in sorted(samples, key=lambda s: s.path):
        groups[s.sha1].append(s)
    return list(groups.values())


def _drop_label_conflicts(samples: list[Sample], dropped: list) -> list[Sample]:
    """Byte-identical copies under different labels: no copy's label can be trusted."""
    kept = []
    for group in _duplicate_groups(samples):
        if len({s.label for s in group}) > 1:
            dropped += [(s.path, "duplicate copies disagree on the label") for s in group]
        else:
            kept += group
    return kept


def _collapse_duplicates(samples: list[Sample], dropped: list) -> list[Sample]:
    """Keep one copy (first by path) of byte-identical files."""
    kept = []
    for group in _duplicate_groups(samples):
        kept.append(group[0])
        dropped += [(s.path, "exact duplicate of a kept image") for s in group[1:]]
    return kept


def _drop_identity_outliers(samples: list[Sample], dropped: list) -> list[Sample]:
    """Drop images whose label disagrees with the strict majority of the same person's images.

    A person's gender does not change between photos, so the minority label is the likely mistake.
    A tie has no majority, and such images are kept.
    """
    votes: dict[str, Counter] = defaultdict(Counter)
    for s in samples:
        if s.identity:
            votes[s.identity][s.label] += 1
    kept = []
    for s in samples:
        tally = votes.get(s.identity)
        if tally and tally[1 - s.label] > tally[s.label]:
            dropped.append((s.path, "label disagrees with its identity's majority"))
        else:
            kept.append(s)
    return kept


def _assign_splits(samples: list[Sample], seed: int) -> list[Sample]:
    """Split 4:1:1, stratified by label, keeping each identity whole.

    Groups are shuffled with the seed, then placed largest first (small groups fill the remaining gaps
    best) into the split furthest below its per-label quota.
    """
    groups: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        groups[f"id:{s.identity}" if s.identity else f"path:{s.path}"].append(s)
    order = sorted(groups)
    random.Random(seed).shuffle(order)
    order.sort(key=lambda k: -len(groups[k]))  # stable: equal sizes keep the shuffled order
    per_label = Counter(s.label for s in samples)
    total_weight = sum(SPLIT_WEIGHTS.values())
    quota = {(sp, y): n * w / total_weight for y, n in per_label.items() for sp, w in SPLIT_WEIGHTS.items()}
    filled: Counter = Counter()
    result = []
    for key in order:
        labels = Counter(s.label for s in groups[key])
        split = max(SPLITS, key=lambda sp: sum(n * (quota[sp, y] - filled[sp, y]) for y, n in labels.items()))
        for y, n in labels.items():
            filled[split, y] += n
        result += [replace(s, split=split) for s in groups[key]]
    return result


def write_manifest(samples: Iterable[Sample], path) -> None:
    with atomic_open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(FIELDS)
        for s in samples:
            age = "" if s.age is None else s.age
            box = "" if s.box is None else " ".join(map(str, s.box))
            points = "" if s.landmarks is None else " ".join(f"{v:g}" for v in s.landmarks)
            writer.writerow((s.path, CLASSES[s.label], s.split, s.source, s.identity, age, s.race, s.sha1, box, points))


# ---------------------------------------------------------------- format readers


def _existing_dir(src) -> Path:
    src = Path(src)
    if not src.is_dir():
        raise UserError(f"{src}: not a folder")
    return src


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.resolve().rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )


def _class_dirs(folder: Path) -> list[tuple[int, Path]]:
    """[(label, folder)] for the class folders directly under ``folder``, names compared without case."""
    found = [(CLASSES.index(d.name.lower()), d) for d in folder.iterdir() if d.is_dir() and d.name.lower() in CLASSES]
    return sorted(found)


def _read_celeba_male(attr_file: Path) -> list[tuple[str, bool]]:
    lines = attr_file.read_text().splitlines()
    if len(lines) < 2 or "Male" not in lines[1].split():
        raise UserError(f"{attr_file}: line 2 must list the attribute names, including Male")
    names = lines[1].split()
    column = names.index("Male")
    rows = []
    for number, line in enumerate(lines[2:], start=3):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != len(names) + 1 or parts[column + 1] not in ("1", "-1"):
            raise UserError(f"{attr_file}:{number}: expected a file name and {len(names)} values of 1 or -1")
        rows.append((parts[0], parts[column + 1] == "1"))
    return rows


def _read_celeba_identities(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    identities = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if parts and len(parts) != 2:
            raise UserError(f"{path}:{number}: expected 'FILE IDENTITY'")
        if parts:
            identities[parts[0]] = parts[1]
    return identities


def _read_labels_csv(path: Path) -> tuple[list[tuple[int, dict]], dict[str, str]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h for h in (reader.fieldnames or []) if h is not None]
        rows = [(number, row) for number, row in enumerate(reader, start=2)]
    by_lower = {h.strip().lower(): h for h in header}
    columns = {}
    for role, names in CSV_COLUMNS.items():
        match = next((by_lower[n] for n in names if n in by_lower), None)
        if match is not None:
            columns[role] = match
    for role in ("path", "label"):
        if role not in columns:
            raise UserError(
                f"{path}: no {role} column; name one of {', '.join(CSV_COLUMNS[role])} (header: {', '.join(header)})"
            )
    return rows, columns


def _parse_label(value: str, path: Path, line: int, column: str) -> int | None:
    value = value.lower()
    if not value:
        return None
    if value in LABEL_WORDS:
        return LABEL_WORDS[value]
    if re.fullmatch(r"[-+]?\d+(\.\d*)?", value):
        raise UserError(
            f"{path}:{line}: column {column!r} holds the number {value!r}; numeric gender codes mean different "
            "things in different datasets (UTKFace: 0 = male), so write female or male instead"
        )
    raise UserError(f"{path}:{line}: column {column!r} holds {value!r}; use female/male (or f/m, woman/man)")


def _parse_age(value: str) -> int | None:
    try:
        return int(float(value))
    except (ValueError, OverflowError):  # age is optional metadata: unreadable means unknown
        return None


def _cell(row: dict, column: str | None) -> str:
    return (row.get(column) or "").strip() if column else ""


# ---------------------------------------------------------------- loading for training and evaluation


def load_samples(data, split: str | None) -> list[Sample]:
    """Samples of ``split`` (None: every split) from a manifest CSV, a folder holding manifest.csv, or a
    split-folder layout ``DATA/{train,val|validation,test}/{female,male}/``."""
    if split is not None and split not in SPLITS:
        raise UserError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    path = Path(data)
    if path.is_file():
        samples = _read_manifest(path)
    elif (path / MANIFEST).is_file():
        samples = _read_manifest(path / MANIFEST)
    elif path.is_dir() and any(_split_dir(path, sp) for sp in SPLITS):
        samples = _read_split_folders(path)
    else:
        raise UserError(
            f"{path}: not a manifest CSV, a folder holding {MANIFEST}, or a folder of "
            "train/val/test class folders; run `prepare` on the raw corpus first"
        )
    if split is not None:
        samples = [s for s in samples if s.split == split]
    if not samples:
        raise UserError(f"{path}: the {split or 'any'} split has no images")
    return samples


def load_samples_many(datas: Sequence, split: str | None) -> list[Sample]:
    return [s for data in datas for s in load_samples(data, split)]


def _read_manifest(path: Path) -> list[Sample]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"path", "label", "split"} - set(reader.fieldnames or [])
        if missing:
            raise UserError(f"{path}: not a manifest; missing column(s) {', '.join(sorted(missing))}")
        rows = list(enumerate(reader, start=2))
    samples = []
    for line, row in rows:
        label, split = row["label"], row["split"]
        if label not in CLASSES or split not in SPLITS or not row["path"]:
            raise UserError(
                f"{path}:{line}: malformed row (path {row['path']!r}, label {label!r}, split {split!r}); "
                f"label must be {' or '.join(CLASSES)}, split one of {', '.join(SPLITS)}"
            )
        age = (row.get("age") or "").strip()
        if age and not age.isdigit():
            raise UserError(f"{path}:{line}: age {age!r} is not a whole number")
        samples.append(
            Sample(
                path=str(path.absolute().parent / row["path"]),  # absolute paths stay as they are
                label=CLASSES.index(label),
                split=split,
                source=row.get("source") or "",
                identity=row.get("identity") or "",
                age=int(age) if age else None,
                race=row.get("race") or "",
                sha1=row.get("sha1") or "",
                box=_parse_box(row.get("box") or "", path, line),
                landmarks=_parse_landmarks(row.get("landmarks") or "", path, line),
            )
        )
    return samples


def _parse_box(text: str, path: Path, line: int) -> tuple[int, int, int, int] | None:
    if not text.strip():
        return None
    try:
        x0, y0, x1, y1 = (int(v) for v in text.split())
    except ValueError:
        raise UserError(f"{path}:{line}: box {text!r} is not four whole numbers 'x0 y0 x1 y1'") from None
    if x1 <= x0 or y1 <= y0:
        raise UserError(f"{path}:{line}: box {text!r} is empty (x1 <= x0 or y1 <= y0)")
    return x0, y0, x1, y1


def _parse_landmarks(text: str, path: Path, line: int) -> tuple[float, ...] | None:
    if not text.strip():
        return None
    try:
        values = tuple(float(v) for v in text.split())
    except ValueError:
        values = ()
    if len(values) != 10:
        raise UserError(f"{path}:{line}: landmarks {text!r} are not ten numbers 'x0 y0 ... x4 y4'")
    return values


def _split_dir(root: Path, split: str) -> Path | None:
    return next((root / d for d in SPLIT_DIRS[split] if (root / d).is_dir()), None)


def _read_split_folders(root: Path) -> list[Sample]:
    root = root.resolve()
    samples = []
    for split in SPLITS:
        folder = _split_dir(root, split)
        if folder is None:
            continue
        samples += [
            Sample(str(path), label, split, root.name)
            for label, class_dir in _class_dirs(folder)
            for path in _image_files(class_dir)
        ]
    return samples


# ---------------------------------------------------------------- reporting


def _counts(samples: Iterable[Sample]) -> dict[str, dict[str, int]]:
    tally = Counter((s.split, s.label) for s in samples)
    return {sp: {c: tally[sp, i] for i, c in enumerate(CLASSES)} for sp in SPLITS}


def _table(counts: dict[str, dict[str, int]]) -> str:
    header = f"{'split':<6}" + "".join(f"{c:>9}" for c in CLASSES) + f"{'total':>9}"
    rows = [header]
    for split, row in [*counts.items(), ("total", {c: sum(r[c] for r in counts.values()) for c in CLASSES})]:
        rows.append(f"{split:<6}" + "".join(f"{row[c]:>9}" for c in CLASSES) + f"{sum(row.values()):>9}")
    return "\n".join(rows)


def counts_table(samples: Iterable[Sample]) -> str:
    """Images per split and class, as a fixed-width table."""
    return _table(_counts(samples))
