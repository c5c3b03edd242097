"""One real run: prepare subsets of the three corpora, train, evaluate and predict through the command line."""
import json

from facegender.cli import main


def test_prepare_finds_the_faces_of_each_corpus(real_subsets):
    from facegender.data import load_samples

    for name, folder in real_subsets.items():
        samples = load_samples(folder, None)
        found = sum(s.box is not None for s in samples) / len(samples)
        assert found > 0.95, (name, found)  # the detector study measured 97-100% on these corpora
        for s in samples[:50]:
            if s.box:
                x0, y0, x1, y1 = s.box
                assert x1 - x0 == y1 - y0 > 20  # square canonical crops


def test_prepare_train_evaluate_predict_on_real_faces(real_subsets, tmp_path, capsys):
    data = [str(real_subsets[name]) for name in ("utkface", "celeba", "scut")]
    run = tmp_path / "run"
    args = ["train", "--out", str(run), "--weights", "none", "--epochs", "2", "--seed", "0"]
    for d in data:
        args += ["--data", d]
    assert main(args) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    for name in ("training_metrics.png", "confusion_matrix.png", "roc_curve.png", "calibration.png"):
        assert (run / name).stat().st_size > 10_000, name
    assert len((run / "metrics.csv").read_text().splitlines()) == 3  # header + two epochs
    # two epochs from random weights on ~1,600 faces: clearly better than chance (0.92 on an AVX2 EPYC),
    # far from the final model
    assert metrics["roc_auc"] > 0.7, metrics["roc_auc"]
    assert set(metrics["by_source"]) == {"utkface", "celeba", "scut_fbp5500"}
    assert {"source", "age_group", "race"} <= set(metrics["groups"])
    assert metrics["calibration"]["ece_after"] <= metrics["calibration"]["ece_before"] + 0.02

    capsys.readouterr()
    assert main(["evaluate", str(run), data[0], "--out", str(tmp_path / "eval")]) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "recall" in printed
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert evaluated["count"] == metrics["by_source"]["utkface"]["count"]
    assert abs(evaluated["accuracy"] - metrics["by_source"]["utkface"]["accuracy"]) < 1e-9

    images = sorted((real_subsets["utkface"]).parent.joinpath("utkface_src").iterdir())[:5]
    assert main(["predict", str(run), *map(str, images)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["source"] for r in rows if r["face"] == 1] == [str(p) for p in images]  # a face in every chip
    for r in rows:
        assert r["label"] in ("female", "male") and 0.5 <= r["confidence"] <= 1
        assert abs(r["confidence"] - (r["p_male"] if r["label"] == "male" else 1 - r["p_male"])) < 1e-9
