import csv
import shutil
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facegender.data import (
    Sample,
    counts_table,
    load_samples,
    load_samples_many,
    prepare_celeba,
    prepare_csv,
    prepare_folder,
    prepare_utkface,
    write_manifest,
)
from facegender.io import UserError

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
_seed = iter(range(10**6))


def _jpeg(path: Path) -> Path:
    """A small JPEG whose bytes differ from every other one made here."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(next(_seed)).integers(0, 255, (12, 12, 3), np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path


def _manifest(out: Path) -> list[dict]:
    with open(out / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def _split_of(rows: list[dict]) -> dict[str, str]:
    return {Path(r["path"]).name: r["split"] for r in rows}


def _assert_groups_whole(rows: list[dict], key: str):
    splits = defaultdict(set)
    for r in rows:
        if r[key]:
            splits[r[key]].add(r["split"])
    assert all(len(s) == 1 for s in splits.values())


# ---------------------------------------------------------------- UTKFace


@pytest.fixture
def utk_tree(tmp_path):
    src = tmp_path / "UTKFace"
    for i in range(48):
        _jpeg(src / f"{20 + i}_{i % 2}_{i % 5}_2017010{i % 10}{i:09d}.jpg.chip.jpg")
    _jpeg(src / "39_1_20170116174525125.jpg.chip.jpg")  # no race field
    _jpeg(src / "25_0_1_20170101000000001.jpg")  # plain .jpg
    for bad_name in ("hello.jpg", "30_2_0_20170101000000002.jpg.chip.jpg", "x_1_0_20170101000000003.jpg.chip.jpg"):
        _jpeg(src / bad_name)
    _jpeg(src / "21_0_4_20161223000000001.jpg.chip.jpg")  # the mislabelled batch
    # A batch picture copied elsewhere as female: the copies disagree, so neither is trusted.
    batch_copy = _jpeg(src / "21_0_4_20161223000000002.jpg.chip.jpg")
    shutil.copy(batch_copy, src / "23_1_1_20170103000000004.jpg.chip.jpg")
    same = _jpeg(src / "50_0_0_20170105000000005.jpg.chip.jpg")
    shutil.copy(same, src / "51_0_0_20170105000000006.jpg.chip.jpg")  # same label: keep one
    clash = _jpeg(src / "60_0_2_20170105000000007.jpg.chip.jpg")
    shutil.copy(clash, src / "60_1_2_20170105000000008.jpg.chip.jpg")  # other label: drop both
    (src / "40_1_0_20170105000000009.jpg.chip.jpg").write_bytes(b"")
    full = _jpeg(tmp_path / "full.jpg").read_bytes()
    (src / "41_1_0_20170105000000010.jpg.chip.jpg").write_bytes(full[: len(full) // 2])
    (src / "README.txt").write_text("not an image, ignored\n")
    return src


def test_prepare_utkface(utk_tree, tmp_path):
    report = prepare_utkface(utk_tree, tmp_path / "out", seed=0, workers=1)
    rows = _manifest(tmp_path / "out")
    by_name = {Path(r["path"]).name: r for r in rows}
    assert len(rows) == report.total == 48 + 2 + 1  # 48 regular, no-race, plain .jpg, one of the same-label pair
    assert Path(rows[0]["path"]).is_absolute()
    assert list(rows[0]) == ["path", "label", "split", "source", "identity", "age", "race", "sha1", "box", "landmarks"]
    assert report.undetected == report.total and all(r["box"] == r["landmarks"] == "" for r in rows)  # no faces

    first = by_name["20_0_0_20170100000000000.jpg.chip.jpg"]
    assert (first["label"], first["age"], first["race"], first["source"]) == ("male", "20", "white", "utkface")
    assert by_name["21_1_1_20170101000000001.jpg.chip.jpg"]["label"] == "female"
    assert by_name["24_0_4_20170104000000004.jpg.chip.jpg"]["race"] == "others"
    no_race = by_name["39_1_20170116174525125.jpg.chip.jpg"]
    assert (no_race["label"], no_race["age"], no_race["race"]) == ("female", "39", "")
    assert "25_0_1_20170101000000001.jpg" in by_name
    assert "50_0_0_20170105000000005.jpg.chip.jpg" in by_name  # first by path of the same-label pair

    dropped = {Path(p).name: reason for p, reason in report.dropped}
    assert dropped == {
        "hello.jpg": "unparseable file name",
        "30_2_0_20170101000000002.jpg.chip.jpg": "unparseable file name",
        "x_1_0_20170101000000003.jpg.chip.jpg": "unparseable file name",
        "21_0_4_20161223000000001.jpg.chip.jpg": "known mislabelled batch",
        "21_0_4_20161223000000002.jpg.chip.jpg": "duplicate copies disagree on the label",
        "23_1_1_20170103000000004.jpg.chip.jpg": "duplicate copies disagree on the label",
        "51_0_0_20170105000000006.jpg.chip.jpg": "exact duplicate of a kept image",
        "60_0_2_20170105000000007.jpg.chip.jpg": "duplicate copies disagree on the label",
        "60_1_2_20170105000000008.jpg.chip.jpg": "duplicate copies disagree on the label",
        "40_1_0_20170105000000009.jpg.chip.jpg": "empty file",
        "41_1_0_20170105000000010.jpg.chip.jpg": "truncated",
    }
    assert (tmp_path / "out" / "dropped.csv").is_file()
    summary = report.summary()
    assert "known mislabelled batch" in summary and "train" in summary and str(report.total) in summary


def test_prepare_is_deterministic_and_seeded(utk_tree, tmp_path):
    prepare_utkface(utk_tree, tmp_path / "a", seed=3, workers=2)
    prepare_utkface(utk_tree, tmp_path / "b", seed=3, workers=1)
    prepare_utkface(utk_tree, tmp_path / "c", seed=4, workers=1)
    a = (tmp_path / "a" / "manifest.csv").read_bytes()
    assert a == (tmp_path / "b" / "manifest.csv").read_bytes()
    assert _split_of(_manifest(tmp_path / "a")) != _split_of(_manifest(tmp_path / "c"))


# ---------------------------------------------------------------- class folders and split proportions


def test_prepare_folder_splits_4_1_1_stratified(tmp_path):
    src = tmp_path / "faces"
    for i in range(90):
        _jpeg(src / "Female" / f"f{i}.jpg")
    for i in range(60):
        _jpeg(src / "MALE" / ("sub" if i % 2 else "") / f"m{i}.png")
    clash = _jpeg(src / "Female" / "clash.jpg")
    shutil.copy(clash, src / "MALE" / "clash.jpg")
    (src / "Female" / "notes.txt").write_text("ignored")
    report = prepare_folder(src, tmp_path / "out", seed=1, workers=1)
    assert report.counts == {
        "train": {"female": 60, "male": 40},
        "val": {"female": 15, "male": 10},
        "test": {"female": 15, "male": 10},
    }
    assert report.dropped_by_reason() == Counter({"duplicate copies disagree on the label": 2})
    rows = _manifest(tmp_path / "out")
    assert {r["source"] for r in rows} == {"faces"}
    assert "female" in counts_table(load_samples(tmp_path / "out", None))


def test_prepare_folder_needs_class_folders(tmp_path):
    _jpeg(tmp_path / "faces" / "a.jpg")
    with pytest.raises(UserError, match="female and male"):
        prepare_folder(tmp_path / "faces", tmp_path / "out")
    (tmp_path / "faces" / "female").mkdir()
    (tmp_path / "faces" / "female" / "empty.jpg").write_bytes(b"")
    with pytest.raises(UserError, match="no usable images; all were dropped \\(1 empty file\\)"):
        prepare_folder(tmp_path / "faces", tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.csv").exists()


# ---------------------------------------------------------------- CelebA


def _celeba_tree(root: Path) -> dict[str, tuple[str, int]]:
    """30 people with 1 to 4 pictures each, plus an outlier, a tie and a duplicate. Returns file -> (id, male)."""
    people: dict[str, tuple[str, int]] = {}
    n = 0
    for person in range(30):
        for _ in range(1 + person % 4):
            n += 1
            people[f"{n:06d}.jpg"] = (str(person), person % 2)
    people["000900.jpg"] = ("3", 0)  # person 3 is male in 4 of 5 pictures: this label is the outlier
    people["000901.jpg"] = ("77", 0)  # person 77: one female, one male label; no strict majority
    people["000902.jpg"] = ("77", 1)
    for name in people:
        _jpeg(root / "img" / name)
    shutil.copy(root / "img" / "000001.jpg", root / "img" / "000903.jpg")
    people["000903.jpg"] = people["000001.jpg"]
    people["999999.jpg"] = ("99", 1)  # listed, but the picture is not in this subset

    # Male is deliberately not at its usual position: the reader must find it by name.
    names = [f"Attr_{i}" for i in range(39)]
    names.insert(5, "Male")
    with open(root / "list_attr_celeba.txt", "w") as f:
        f.write(f"{len(people)}\n{' '.join(names)}\n")
        for name, (_, male) in people.items():
            values = ["-1"] * 40
            values[5] = "1" if male else "-1"
            values[0] = "1"
            f.write(f"{name} {'  '.join(values)}\n")
    with open(root / "identity_CelebA.txt", "w") as f:
        f.writelines(f"{name} {person}\n" for name, (person, _) in people.items())
    return people


def test_prepare_celeba(tmp_path):
    people = _celeba_tree(tmp_path / "celeba")
    report = prepare_celeba(tmp_path / "celeba", tmp_path / "out", workers=1)
    rows = _manifest(tmp_path / "out")
    by_name = {Path(r["path"]).name: r for r in rows}
    assert report.dropped_by_reason() == Counter(
        {"label disagrees with its identity's majority": 1, "exact duplicate of a kept image": 1}
    )
    assert "000900.jpg" not in by_name and "000903.jpg" not in by_name and "999999.jpg" not in by_name
    assert by_name["000901.jpg"]["label"] == "female" and by_name["000902.jpg"]["label"] == "male"
    for name, row in by_name.items():
        person, male = people[name]
        assert (row["identity"], row["label"], row["source"]) == (person, ("female", "male")[male], "celeba")
    _assert_groups_whole(rows, "identity")
    splits = Counter(r["split"] for r in rows)
    assert splits["train"] > splits["val"] > 0 and splits["test"] > 0


def test_prepare_celeba_without_identities_and_images_beside_the_lists(tmp_path):
    _celeba_tree(tmp_path / "c")
    for f in (tmp_path / "c" / "img").iterdir():
        f.rename(tmp_path / "c" / f.name)
    (tmp_path / "c" / "img").rmdir()
    (tmp_path / "c" / "identity_CelebA.txt").unlink()
    report = prepare_celeba(tmp_path / "c", tmp_path / "out", workers=1)
    assert report.dropped_by_reason() == Counter({"exact duplicate of a kept image": 1})
    assert all(r["identity"] == "" for r in _manifest(tmp_path / "out"))


# ---------------------------------------------------------------- labelled CSV


def test_prepare_csv(tmp_path):
    root = tmp_path / "my_corpus"
    values = ["F", "Man", "woman", "male", "female", "M"] * 4
    for i in range(len(values)):
        _jpeg(root / "img" / f"p{i}.jpg")
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["File", "Sex", "Race", "Age", "Identity", "box"])
        w.writerows([f"p{i}.jpg", v, "Asian", 20 + i, f"id{i // 2}", "1 2 3 4"] for i, v in enumerate(values))
        w.writerow(["gone.jpg", "female", "", "", "", ""])
        w.writerow(["p0.jpg", "", "", "", "", ""])
    report = prepare_csv(root / "labels.csv", tmp_path / "out", workers=1)
    rows = _manifest(tmp_path / "out")
    assert len(rows) == len(values)
    by_name = {Path(r["path"]).name: r for r in rows}
    assert [by_name[f"p{i}.jpg"]["label"] for i in range(6)] == ["female", "male", "female", "male", "female", "male"]
    assert by_name["p3.jpg"]["race"] == "asian" and by_name["p3.jpg"]["age"] == "23"
    assert {r["source"] for r in rows} == {"my_corpus"}
    assert report.dropped_by_reason() == Counter({"file not found": 1, "no gender label": 1})
    _assert_groups_whole(rows, "identity")


def test_prepare_csv_with_image_root(tmp_path):
    for i in range(6):
        _jpeg(tmp_path / "pictures" / f"{i}.png")
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "labels.csv").write_text(
        "path,label\n" + "".join(f"{i}.png,{'male' if i % 2 else 'female'}\n" for i in range(6))
    )
    report = prepare_csv(tmp_path / "lists" / "labels.csv", tmp_path / "out", image_root=tmp_path / "pictures")
    assert report.total == 6 and not report.dropped


def test_prepare_csv_rejects_numeric_and_unknown_columns(tmp_path):
    _jpeg(tmp_path / "a.jpg")
    (tmp_path / "numeric.csv").write_text("file,gender\na.jpg,0\n")
    with pytest.raises(UserError, match="numeric.csv:2.*write female or male"):
        prepare_csv(tmp_path / "numeric.csv", tmp_path / "out")
    (tmp_path / "nofile.csv").write_text("name,gender\na.jpg,female\n")
    with pytest.raises(UserError, match="no path column"):
        prepare_csv(tmp_path / "nofile.csv", tmp_path / "out")
    with pytest.raises(UserError, match="not found"):
        prepare_csv(tmp_path / "absent.csv", tmp_path / "out")


# ---------------------------------------------------------------- loading


def test_load_samples_from_manifest_and_folder(tmp_path):
    src = tmp_path / "faces"
    for i in range(12):
        _jpeg(src / ("female", "male")[i % 2] / f"{i}.jpg")
    prepare_folder(src, tmp_path / "out", workers=1)
    train = load_samples(tmp_path / "out", "train")
    assert train == load_samples(tmp_path / "out" / "manifest.csv", "train")
    assert all(isinstance(s, Sample) and s.split == "train" and s.sha1 for s in train)
    everything = load_samples(tmp_path / "out", None)
    assert len(everything) == 12
    assert len(load_samples_many([tmp_path / "out", tmp_path / "out"], "val")) == 2 * len(
        load_samples(tmp_path / "out", "val")
    )


def test_load_samples_tolerates_extra_columns_and_relative_paths(tmp_path):
    (tmp_path / "m.csv").write_text("path,label,split,box,age,note\nimg/a.jpg,male,test,1 2 3 4,31,x\n")
    [s] = load_samples(tmp_path / "m.csv", "test")
    assert s == Sample(str(tmp_path / "img" / "a.jpg"), 1, "test", "", age=31, box=(1, 2, 3, 4))
    (tmp_path / "bad.csv").write_text("path,label,split,box\nimg/a.jpg,male,test,1 2 x 4\n")
    with pytest.raises(UserError, match="bad.csv:2: box"):
        load_samples(tmp_path / "bad.csv", "test")


def test_manifest_landmarks_round_trip_and_bad_ones_are_named(tmp_path):
    points = (101.0, 72.0, 85.5, 73.0, 45.0, 72.0, 60.0, 73.0, 73.0, 102.0)
    sample = Sample(str(tmp_path / "a.jpg"), 0, "train", "x", box=(16, 32, 131, 147), landmarks=points)
    write_manifest([sample], tmp_path / "m.csv")
    assert load_samples(tmp_path / "m.csv", "train") == [sample]
    (tmp_path / "bad.csv").write_text("path,label,split,landmarks\na.jpg,male,test,1 2 3\n")
    with pytest.raises(UserError, match="bad.csv:2: landmarks '1 2 3' are not ten numbers"):
        load_samples(tmp_path / "bad.csv", "test")


def test_load_samples_from_split_folders(tmp_path):
    data = tmp_path / "DATA"
    for split in ("train", "validation", "test"):
        for cls in ("female", "Male"):
            _jpeg(data / split / cls / f"{split}_{cls}.jpg")
    val = load_samples(data, "val")
    assert sorted((Path(s.path).name, s.label, s.split, s.source) for s in val) == [
        ("validation_Male.jpg", 1, "val", "DATA"),
        ("validation_female.jpg", 0, "val", "DATA"),
    ]
    assert len(load_samples(data, None)) == 6


def test_load_samples_errors(tmp_path):
    with pytest.raises(UserError, match="nowhere"):
        load_samples(tmp_path / "nowhere", "train")
    _jpeg(tmp_path / "DATA" / "train" / "female" / "a.jpg")
    with pytest.raises(UserError, match="test split has no images"):
        load_samples(tmp_path / "DATA", "test")
    with pytest.raises(UserError, match="unknown split"):
        load_samples(tmp_path / "DATA", "holdout")
    (tmp_path / "bad.csv").write_text("path,label,split\na.jpg,male,train\nb.jpg,boy,train\n")
    with pytest.raises(UserError, match="bad.csv:3"):
        load_samples(tmp_path / "bad.csv", "train")
    (tmp_path / "other.csv").write_text("file,gender\na.jpg,male\n")
    with pytest.raises(UserError, match="missing column"):
        load_samples(tmp_path / "other.csv", "train")


# ---------------------------------------------------------------- the real corpus


@pytest.mark.skipif(not (REAL_DATA / "utkface").is_dir(), reason=f"real UTKFace not present at {REAL_DATA}/utkface")
def test_prepare_real_utkface(tmp_path):
    start = time.monotonic()
    report = prepare_utkface(REAL_DATA / "utkface", tmp_path, workers=2, detect=False)  # detection: test_e2e
    assert time.monotonic() - start < 60
    reasons = report.dropped_by_reason()
    # README: 40 duplicate groups (82 files) disagree on the label; 12 of the 21 batch files are among them.
    assert reasons["duplicate copies disagree on the label"] == 82
    assert reasons["known mislabelled batch"] == 9
    # 375 groups hold 765 files: 390 surplus copies, less 41 in conflicting groups and 1 batch file.
    assert reasons["exact duplicate of a kept image"] == 347
    assert report.total + len(report.dropped) == 23707
    rows = _manifest(tmp_path)
    assert len({r["sha1"] for r in rows}) == len(rows)
    assert not any(Path(r["path"]).name.startswith("21_0_4_20161223") for r in rows)
    assert sum(r["race"] == "" for r in rows) == 3  # the three names without a race field are kept
    for cls in ("female", "male"):
        n = {sp: report.counts[sp][cls] for sp in ("train", "val", "test")}
        assert abs(n["val"] - sum(n.values()) / 6) <= 1 and abs(n["test"] - sum(n.values()) / 6) <= 1
