import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from facegender.cli import main


def _cli(*args, timeout=600):
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "facegender.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.parametrize("command", ["prepare", "train", "evaluate", "predict", "export", "serve"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0 and "usage: facegender " + command in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["train", "--data", "/nonexistent/data", "--out", "{tmp}/run", "--weights", "none"], "/nonexistent/data"),
    (["train", "--out", "{tmp}/run"], "--data"),
    (["prepare", "utkface", "/nonexistent/utk", "{tmp}/out"], "/nonexistent/utk"),
    (["evaluate", "{tmp}/nothing", "{tmp}"], "nothing"),
    (["predict", "--model", "{tmp}/gone.safetensors", "{tmp}/x.jpg"], "gone.safetensors"),
    (["export", "{tmp}/nothing", "{tmp}/m.safetensors"], "nothing"),
    (["serve", "{tmp}/gone.safetensors"], "gone.safetensors"),
    (["serve", "--workers", "2", "{tmp}/gone"], "gone"),
    (["serve", "--workers", "2", "--min-face", "nan"], "--min-face nan: must be a number of px above 0"),
    (["train", "--data", "{tmp}", "--out", "{tmp}/run", "--weights", "{tmp}/missing.pth"], "missing.pth"),
])
def test_user_mistakes_get_one_line_and_exit_2(tmp_path, args, message):
    result = _cli(*[a.replace("{tmp}", str(tmp_path)) for a in args], timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [l for l in result.stderr.splitlines() if l.startswith("facegender: error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_killed_training_resumes_from_its_last_checkpoint(synthetic_dataset, tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "facegender.cli", "train", "--data", str(synthetic_dataset), "--out", str(run),
            "--weights", "none", "--epochs", "40", "--batch-size", "16"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run / "last.json").is_file() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = json.loads((run / "last.json").read_text())["epoch"]
    assert 1 <= done < 40
    result = _cli("train", "--out", run, "--resume", "--epochs", done + 1)
    assert result.returncode == 0, result.stderr
    history = (run / "metrics.csv").read_text().splitlines()
    assert len(history) == done + 2  # header + every epoch once, none repeated
    assert history[0] == "epoch,train_loss,train_acc,val_loss,val_acc,lr,images_per_s,seconds,wall_seconds"
    assert json.loads((run / "last.json").read_text())["epoch"] == done + 1
    assert (run / "metrics.json").is_file()


def test_predict_reports_bad_files_and_keeps_going(synthetic_dataset, tmp_path):
    from facegender.config import load_config
    from facegender.train import train

    run = tmp_path / "run"
    train(load_config(weights="none", epochs=1), [str(synthetic_dataset)], run, log=lambda *_: None)
    good = sorted((synthetic_dataset / "test" / "male").iterdir())[:3]
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    out = tmp_path / "pred.csv"
    result = _cli("predict", run, good[0], bad, *good[1:], "--format", "csv", "--output", out, "--no-detect")
    assert result.returncode == 1 and "notes.jpg" in result.stderr and "Traceback" not in result.stderr
    lines = out.read_text().splitlines()
    assert lines[0] == "source,faces,face,box,label,confidence,p_male,error" and len(lines) == 5
    assert "notes.jpg" in lines[2] and lines[2].split(",")[4] == ""
    for name, first in (("named.csv", lines[0]), ("named.jsonl", "{")):  # the format from the file's name
        _cli("predict", run, good[0], bad, *good[1:], "--output", tmp_path / name, "--no-detect")
        assert (tmp_path / name).read_text().startswith(first)
    folder = _cli("predict", "--model", run, synthetic_dataset / "test", "--no-detect")
    assert folder.returncode == 0 and len(folder.stdout.splitlines()) == 32
    undetected = json.loads(_cli("predict", run, good[0]).stdout)  # drawn discs are no faces
    assert undetected["faces"] == 0 and undetected["label"] is None


def test_predict_annotates_real_faces(synthetic_dataset, tmp_path):
    from facegender.config import load_config
    from facegender.train import train
    from test_inference import _two_faces

    run = tmp_path / "run"
    train(load_config(weights="none", epochs=1), [str(synthetic_dataset)], run, log=lambda *_: None)
    photo = _two_faces(tmp_path)
    result = _cli("predict", run, photo, "--annotate", tmp_path / "drawn", "--min-confidence", "0.6")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["face"] for r in rows] == [1, 2] and all(len(r["box"]) == 4 for r in rows)
    assert all(r["label"] in ("female", "male", "uncertain") for r in rows)
    assert (tmp_path / "drawn" / "two.png").stat().st_size > 10_000


@pytest.mark.parametrize("argv, expected", [
    (["predict", "run", "--no-detect", "a.jpg", "b.jpg"], {"inputs": ["run", "a.jpg", "b.jpg"], "no_detect": True}),
    (["predict", "a.jpg", "--format", "csv", "b.jpg", "--min-confidence", "0.7"],
     {"inputs": ["a.jpg", "b.jpg"], "format": "csv", "min_confidence": 0.7}),
    (["prepare", "utkface", "--seed", "3", "src", "--no-detect", "out"],
     {"kind": "utkface", "src": "src", "out": "out", "seed": 3, "no_detect": True}),
    (["evaluate", "run", "--split", "val", "d1", "--batch-size", "8", "d2"],
     {"checkpoint": "run", "data": ["d1", "d2"], "split": "val", "batch_size": 8}),
    (["export", "run", "--dtype", "float32", "out.safetensors"],
     {"checkpoint": "run", "out": "out.safetensors", "dtype": "float32"}),
    (["train", "--out", "r", "--data", "d1", "--epochs", "2", "--data", "d2"], {"data": ["d1", "d2"], "epochs": 2}),
    (["serve", "--port", "9000", "run", "--no-micro-batching"], {"checkpoint": "run", "port": 9000, "no_micro_batching": True}),
])
def test_options_work_anywhere_on_the_line(argv, expected):
    from facegender.cli import parse_args

    args = vars(parse_args(argv))
    assert {k: args[k] for k in expected} == expected and args["command"] == argv[0]


def test_predict_with_an_option_between_the_images_runs(tmp_path):
    from facegender.inference import BUNDLED_MODEL
    from test_serve import ASTRONAUT, CAT

    out = tmp_path / "rows.jsonl"
    assert main(["predict", str(BUNDLED_MODEL), "--no-detect", str(ASTRONAUT), str(CAT), "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["source"], r["faces"], r["box"]) for r in rows] == [(str(ASTRONAUT), None, None), (str(CAT), None, None)]
    assert all(r["label"] in ("female", "male") for r in rows)


def test_a_misspelt_command_still_gets_argparse_s_message(capsys):
    with pytest.raises(SystemExit) as e:
        main(["predcit", "a.jpg"])
    assert e.value.code == 2 and "invalid choice: 'predcit'" in capsys.readouterr().err


def test_serve_command_answers_on_loopback_with_two_worker_processes():
    import socket

    import httpx
    from test_serve import ASTRONAUT

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "facegender.cli", "serve", "--port", str(port), "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 600  # two processes import torch and load the model; slow on a busy machine
        while True:
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/predict", files={"file": ("a.png", ASTRONAUT.read_bytes())},
                       timeout=60)
        assert r.status_code == 200 and r.json()["predictions"][0]["label"] == "female"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0


def _folder_of_photos(folder: Path, n: int) -> Path:
    """``n`` real photos (the astronaut, shifted) and a broken file."""
    skimage_data = pytest.importorskip("skimage.data", reason="the astronaut photo comes with scikit-image")
    from PIL import Image

    folder.mkdir()
    photo = Image.fromarray(skimage_data.astronaut())
    for i in range(n):
        photo.crop((i, 0, 512 - i, 512)).save(folder / f"{i:02d}.jpg", quality=90)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a whole jpeg")
    return folder


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_a_folder_labelled_on_a_terminal_shows_a_bar_and_says_what_failed_above_it(tmp_path):
    """The bar needs a terminal for stderr, the rows going elsewhere; without one there is no bar, tqdm is not
    even imported (it cost labelling one photo 27 ms), and what failed is still one line."""
    folder = _folder_of_photos(tmp_path / "photos", 10)
    probe = ("import runpy, sys; sys.argv = ['facegender', *sys.argv[1:]]\n"
             "try:\n    runpy.run_module('facegender.cli', run_name='__main__')\n"
             "finally:\n    print('tqdm imported' if 'tqdm' in sys.modules else 'no tqdm', file=sys.stderr)\n")
    out = tmp_path / "rows.jsonl"
    leader, follower = os.openpty()
    import fcntl
    import struct
    import termios

    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal 100 columns wide
    try:
        done = subprocess.run([sys.executable, "-c", probe, "predict", str(folder), "--output", str(out)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=follower, timeout=300)
        os.close(follower)
        shown = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the other end closed: all read
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(leader)
    on_terminal = shown.decode(errors="replace")
    assert done.returncode == 1  # one file failed
    assert "predict: 100%" in on_terminal and "11/11" in on_terminal and "tqdm imported" in on_terminal
    assert "facegender: warning:" in on_terminal and "broken.jpg" in on_terminal
    assert out.read_text().count("\n") == 11
    piped = subprocess.run([sys.executable, "-c", probe, "predict", str(folder), "--output", str(out)],
                           capture_output=True, text=True, timeout=300)
    assert piped.returncode == 1 and "predict:" not in piped.stderr and "no tqdm" in piped.stderr
    warnings = [line for line in piped.stderr.splitlines() if line.startswith("facegender: warning:")]
    assert len(warnings) == 1 and "broken.jpg" in warnings[0]
