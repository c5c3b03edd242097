"""The ``facegender`` command: parse, call the library, print. Everything here is callable from Python."""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import sys
import warnings
from pathlib import Path

from .io import UserError, atomic_path


def _warning_line(message, category, filename, lineno, line=None) -> str:
    return f"facegender: warning: {message}\n"


class MissingExtra(UserError):
    """A command whose optional dependencies are not installed: the message is the whole line."""


# what each extra brings (import names), and the commands that need it
EXTRAS = {
    "train": ("the training extra", ("torch", "torchvision", "onnx", "onnxscript", "sklearn", "scipy", "matplotlib")),
    "eval": ("the evaluation extra", ("sklearn", "scipy", "matplotlib")),
    "serve": ("the serving extra", ("fastapi", "uvicorn", "python_multipart", "swagger_ui_bundle")),
    "ray": ("the Ray extra", ("ray", "pyarrow")),
}


def require(command: str, extra: str) -> None:
    """Stop with one line where ``command`` needs an extra that is not installed."""
    name, modules = EXTRAS[extra]
    if not all(importlib.util.find_spec(m) for m in modules):
        raise MissingExtra(f"facegender {command} needs {name}: pip install 'facegender[{extra}]'")


def cmd_prepare(args) -> int:
    from . import data

    preparers = {"utkface": data.prepare_utkface, "celeba": data.prepare_celeba,
                 "csv": data.prepare_csv, "folder": data.prepare_folder}
    report = preparers[args.kind](args.src, args.out, seed=args.seed, workers=args.workers, detect=not args.no_detect,
                                  detector=args.detector)
    print(report.summary())
    print(f"manifest: {Path(args.out) / 'manifest.csv'}")
    return 0


def cmd_train(args) -> int:
    require("train", "train")
    from . import distributed
    from .config import load_config
    from .train import train

    overrides = {"epochs": args.epochs, "weights": args.weights, "pipeline": args.pipeline,
                 "precision": args.precision, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                 "max_train_images": args.max_train_images, "device": args.device, "workers": args.workers,
                 "freeze_backbone": True if args.freeze_backbone else None,
                 "compile": True if args.compile else None, "label_smoothing": args.label_smoothing,
                 "distill": args.distill, "distill_weight": args.distill_weight,
                 "distill_temperature": args.distill_temperature,
                 "deterministic": True if args.deterministic else None}
    if args.resume:
        config = load_config(epochs=args.epochs) if args.epochs else None  # the rest is the run's own
    elif not args.data:
        raise UserError("train: give at least one --data DATASET (a prepared folder, manifest.csv or split folders)")
    else:
        config = load_config(args.config, **overrides)
    if args.kind != "resnet18":
        if args.resume or distributed.launched():
            raise UserError(f"--kind {args.kind} fits in seconds on one process: no --resume, no torchrun")
        from .heads import train_descriptor_head, train_ensemble

        if args.kind == "descriptor":
            train_descriptor_head(config, args.data, args.out)
        else:
            train_ensemble(config, args.data, args.out, args.members or [])
        return 0
    if args.members:
        raise UserError("--members is for --kind ensemble")
    if distributed.launched():  # one rank of a torchrun job: the same run, its batches shared out
        def as_rank(comm, log) -> None:
            if config is not None and comm.device.type == "cuda":
                config.device = str(comm.device)
            train(config, args.data, args.out, resume=args.resume, log=log, comm=comm)

        distributed.leave(distributed.train(as_rank, args.out))
    train(config, args.data, args.out, resume=args.resume)
    return 0


def cmd_evaluate(args) -> int:
    require("evaluate", "eval")
    from .evaluate import evaluate_checkpoint

    _decoding_limits(args)
    evaluate_checkpoint(args.checkpoint, args.data, split=args.split, out=args.out, batch_size=args.batch_size,
                        device=args.device)
    return 0


def cmd_export(args) -> int:
    require("export", "train")
    from .export import export_model

    export_model(args.checkpoint, args.out, dtype=args.dtype, check=args.check, tolerance=args.tolerance,
                 fmt=args.format, int8=args.int8)
    return 0


def cmd_serve(args) -> int:
    require("serve", "serve")
    from .images import DEFAULT_MAX_PIXELS
    from .serve import DEFAULT_BODY_TIMEOUT, DEFAULT_MAX_MEMORY_MB, check_limits, serve

    defaults = {"max_pixels": DEFAULT_MAX_PIXELS, "max_memory_mb": DEFAULT_MAX_MEMORY_MB,
                "body_timeout": DEFAULT_BODY_TIMEOUT}
    limits = {k: default if getattr(args, k) is None else getattr(args, k) for k, default in defaults.items()}
    check_limits(args.max_upload_mb, **limits)  # once here, not once in each worker process
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        warnings.warn(f"--host {args.host}: the API is reachable from other machines, without authentication")
    serve(args.checkpoint, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb, workers=args.workers,
          micro_batching=not args.no_micro_batching, device=args.device, backend=args.backend,
          model_threads=args.model_threads, detector=args.detector, min_face=args.min_face, **limits)
    return 0


def _decoding_limits(args) -> None:
    from .images import map_large_buffers, set_max_pixels

    map_large_buffers()  # a large image's memory goes back to the system when it is decoded
    if args.max_pixels is not None:
        set_max_pixels(args.max_pixels)


def _is_checkpoint(path: str) -> bool:
    p = Path(path)
    return p.suffix in (".safetensors", ".onnx") or (p.is_dir() and (p / "best.safetensors").is_file())


def cmd_predict(args) -> int:
    from .images import keep_freed_memory
    from .inference import Classifier, expand_inputs

    _decoding_limits(args)
    keep_freed_memory()  # a process of its own, photo after photo
    inputs = list(args.inputs)
    model = args.model
    if model is None and inputs and _is_checkpoint(inputs[0]):
        model = inputs.pop(0)
    if not inputs:
        raise UserError("predict: no images given")
    if args.ray:
        return _predict_ray(args, model, inputs)
    clf = Classifier.from_checkpoint(model, device=args.device, backend=args.backend,
                                     detect=not args.no_detect, detector=args.detector,
                                     min_face=args.min_face, min_confidence=args.min_confidence)
    annotator = Annotator(Path(args.annotate)) if args.annotate else None
    fmt = args.format or ("csv" if args.output and Path(args.output).suffix.lower() == ".csv" else "jsonl")
    out = open(args.output, "w", encoding="utf-8", newline="") if args.output else sys.stdout
    failures = 0
    try:
        writer = None
        files = list(expand_inputs(inputs))
        # a bar for runs worth watching, on a terminal that the rows are not printed to (tqdm is imported only
        # then: labelling one photo took 0.633 s with it, 0.606 without)
        progress, say = files, print
        if len(files) >= 10 and (args.output or not sys.stdout.isatty()) and sys.stderr.isatty():
            from tqdm import tqdm

            progress = tqdm(files, desc="predict", unit="file")
            say = progress.write  # a line above the bar
        for pred in clf.iter_predict(progress, batch_size=args.batch_size, workers=args.workers):
            row = pred.to_dict()
            if pred.error:
                failures += 1
                say(f"facegender: warning: {pred.error}", file=sys.stderr)
            if annotator:
                annotator.add(pred)
            if fmt == "csv":
                row["box"] = "" if pred.box is None else " ".join(f"{v:g}" for v in pred.box)
                if writer is None:
                    writer = csv.DictWriter(out, fieldnames=list(row))
                    writer.writeheader()
                writer.writerow(row)
            else:
                out.write(json.dumps(row) + "\n")
            out.flush()  # an interrupted run over many files keeps every line it printed
        if annotator:
            annotator.flush()
        if progress is not files:
            progress.close()
    finally:
        if out is not sys.stdout:
            out.close()
    return 1 if failures else 0


def _predict_ray(args, model, inputs) -> int:
    require("predict --ray", "ray")
    from .batch_ray import predict_ray

    if not args.output:
        raise UserError("predict --ray: give --output DIR, the folder for the Parquet shards")
    if args.annotate:
        raise UserError("predict --ray: --annotate is not available on Ray; run predict without --ray for it")
    stats = predict_ray(model, inputs, args.output, args.ray, device=args.device, detect=not args.no_detect,
                        min_confidence=args.min_confidence, batch_size=args.batch_size, workers=args.ray_workers,
                        detector=args.detector, min_face=args.min_face)
    return 1 if stats["errors"] else 0


class Annotator:
    """Collects an image's predictions (they arrive in input order) and writes its annotated copy."""

    def __init__(self, folder: Path):
        self.folder, self.source, self.preds, self.used = folder, None, [], set()
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, pred) -> None:
        if pred.source != self.source:
            self.flush()
            self.source = pred.source
        self.preds.append(pred)

    def flush(self) -> None:
        from .images import BadImage, open_rgb
        from .inference import annotate

        preds, self.preds = self.preds, []
        if not preds or preds[0].error:
            return
        try:
            image = annotate(open_rgb(preds[0].source), preds)
        except BadImage:  # it was readable a moment ago; nothing to draw on now
            return
        name = Path(preds[0].source)
        target = self.folder / f"{name.stem}.png"
        n = 1
        while target.name in self.used:  # the same file name from different folders
            n += 1
            target = self.folder / f"{name.stem}-{n}.png"
        self.used.add(target.name)
        with atomic_path(target) as tmp:
            image.save(tmp, format="PNG")


# detect.DETECTORS and DEFAULT_DETECTOR, spelled out so that building the parser imports nothing heavy
DETECTOR_OPTION = {"choices": ["blazeface", "hog"], "default": "blazeface",
                   "help": "face detector: blazeface (default: MediaPipe's BlazeFace, finds tilted, profile and "
                           "small faces) or hog (dlib's HOG: upright, near-frontal faces of 80 px and more)"}
MIN_FACE = 40  # detect.MIN_FACE, spelled out for the same reason
MAX_SIDE = 1280  # detect.MAX_SIDE, likewise
MIN_FACE_HELP = (f"BlazeFace only: the smallest face to look for, in px of the photo (default {MIN_FACE}, and in photos "
                 f"over {MAX_SIDE} px the same share of the photo: {MIN_FACE * 4000 / MAX_SIDE:.0f} px in a 4000 px one); "
                 "smaller finds faces further away and costs more time per photo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facegender", description="Train, evaluate and use a face gender classifier.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="index a labelled corpus into a manifest with train/val/test splits",
                       description="Write OUT/manifest.csv: deduplicated, with identity-safe 4:1:1 splits.")
    p.add_argument("kind", choices=["utkface", "celeba", "csv", "folder"], help="the corpus's layout")
    p.add_argument("src", help="utkface/celeba/folder: the image folder; csv: the labels CSV")
    p.add_argument("out", help="output folder for manifest.csv")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    p.add_argument("--workers", type=int, default=2, help="processes for hashing, checking and face detection")
    p.add_argument("--no-detect", action="store_true",
                   help="do not detect faces: train on whole images (for data that are already face crops)")
    p.add_argument("--detector", **DETECTOR_OPTION)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train with the reference recipe",
                       description="Train ResNet18 on one or more datasets; writes checkpoints, metrics and plots to --out.")
    p.add_argument("--data", action="append", default=[], help="prepared dataset folder, manifest.csv or split folders; repeat to combine")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--config", help="YAML file overriding the reference defaults (e.g. configs/reference.yaml)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--weights", help="imagenet (default), none, or a ResNet18 state-dict file")
    p.add_argument("--freeze-backbone", action="store_true", help="train only the head")
    p.add_argument("--pipeline", choices=["fast", "reference"], help="fast: cached uint8 + batched augmentation (default)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--deterministic", action="store_true",
                   help="repeat bit for bit on a GPU too (deterministic cuDNN/cuBLAS kernels; slower there)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--max-train-images", type=int, help="use a seeded random subset of the training split")
    p.add_argument("--label-smoothing", type=float, help="targets pulled towards 0.5 by this much (default 0)")
    p.add_argument("--distill", metavar="TEACHER",
                   help="also learn the soft targets of this checkpoint (e.g. a --kind descriptor run): distillation")
    p.add_argument("--distill-weight", type=float, help="share of the loss on the teacher's soft targets (default 0.5)")
    p.add_argument("--distill-temperature", type=float, help="softening temperature for distillation (default 2)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--kind", choices=["resnet18", "descriptor", "ensemble"], default="resnet18",
                   help="resnet18: the reference recipe (default); descriptor: a head on dlib face descriptors "
                        "(seconds once they are cached); ensemble: combine --members on validation")
    p.add_argument("--members", nargs=2, metavar=("RESNET18", "DESCRIPTOR"),
                   help="with --kind ensemble: the two checkpoints (run directories or .safetensors) to combine")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="metrics and plots of a checkpoint on a dataset split")
    p.add_argument("checkpoint",
                   help="run directory, .safetensors or .onnx file, or a bundled model's name (descriptor, resnet18)")
    p.add_argument("data", nargs="+", help="dataset(s): prepared folder, manifest.csv or split folders")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--out",
                   help="report folder (default: CHECKPOINT_DIR/eval_SPLIT; runs/eval-NAME-SPLIT for a bundled model)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    _max_pixels_option(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="label images",
                       description="Print label, confidence and P(male) per image as JSON lines or CSV.")
    p.add_argument("inputs", nargs="+", metavar="[CHECKPOINT] IMAGE_OR_DIR",
                   help="optionally a checkpoint first (run dir, .safetensors or .onnx), then images or folders")
    p.add_argument("--model", help="checkpoint, instead of giving it first, or a bundled model: descriptor (the "
                                   "default: a head on dlib face descriptors) or resnet18 (the reference network)")
    p.add_argument("--format", choices=["jsonl", "csv"],
                   help="default: csv for an --output whose name ends in .csv, else jsonl")
    p.add_argument("--output", help="write to this file instead of standard output (with --ray: a folder)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", choices=["auto", "torch", "onnxruntime"], default="auto",
                   help="what runs the model (default auto: onnxruntime, no PyTorch, for an .onnx file, a bundled "
                        "model or a descriptor head; torch for a ResNet18 checkpoint of your own where it is "
                        "installed); onnxruntime converts such a checkpoint to ONNX first (cached; needs PyTorch)")
    p.add_argument("--workers", type=int, help="threads decoding and detecting faces while the model runs "
                   "(default: one per CPU this process may use, at most 4, and none on one CPU; 0: none)")
    p.add_argument("--no-detect", action="store_true", help="inputs are face crops already: classify whole images")
    p.add_argument("--detector", **DETECTOR_OPTION)
    p.add_argument("--min-face", type=float, metavar="PX", help=MIN_FACE_HELP)
    p.add_argument("--min-confidence", type=float, default=0.0,
                   help="below this confidence the label is 'uncertain' instead of a guess (default 0: always guess)")
    p.add_argument("--annotate", metavar="DIR", help="write a copy of each image with boxes and labels drawn here "
                   "(one under 400 px enlarged, so that its labels fit)")
    p.add_argument("--ray", metavar="ADDRESS",
                   help="label on Ray (pip install 'facegender[ray]'): local starts one here, auto joins this "
                        "machine's cluster, ray://HEAD:10001 a remote one; --output is then a folder of Parquet shards")
    p.add_argument("--ray-workers", type=int,
                   help="labelling actors, one model each (default: one per GPU of the cluster, else one per CPU)")
    _max_pixels_option(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="write a checkpoint's model alone, for shipping",
                       description="Write the weights and metadata of a checkpoint without its training state: "
                                   "a .safetensors checkpoint, or an ONNX graph (float32, or int8 with --int8; any "
                                   "batch size).")
    p.add_argument("checkpoint", help="run directory, .safetensors file, or a bundled model's name (descriptor, resnet18)")
    p.add_argument("out", help="the file to write: .safetensors (its metadata is also written beside it as .json) or .onnx")
    p.add_argument("--format", choices=["safetensors", "onnx"], help="default: from the suffix of OUT")
    p.add_argument("--dtype", choices=["float16", "float32"],
                   help="safetensors: float16 (default) or float32; ONNX is always float32")
    p.add_argument("--check", nargs="+", metavar="DATA",
                   help="prepared datasets: safetensors: keep float16 only if it changes no test-split P(male) by "
                        "more than --tolerance; onnx: refuse to write a graph that does")
    p.add_argument("--tolerance", type=float,
                   help="in P(male): default 1e-3 (float16), 1e-4 (onnx); with --int8 in points of test accuracy: 0.3")
    p.add_argument("--int8", nargs="+", metavar="DATA",
                   help="onnx, descriptor models: quantise the network to int8, calibrated on faces of these prepared "
                        "datasets' validation splits; with --check, refuse if test accuracy drops more than --tolerance")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="HTTP API and web page",
                       description="Serve POST /v1/predict, /v1/predict/batch, GET /v1/model, /healthz, the API "
                                   "docs at /docs and a web page at /.")
    p.add_argument("checkpoint", nargs="?",
                   help="run directory, .safetensors or .onnx file, or a bundled model's name (default: the bundled model)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-upload-mb", type=float, default=10, help="largest request body, in MiB (default 10)")
    p.add_argument("--workers", type=int, default=1, help="server processes, each with its own model (default 1)")
    p.add_argument("--no-micro-batching", action="store_true",
                   help="one forward pass per request instead of sharing passes between concurrent requests")
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", choices=["auto", "torch", "onnxruntime"], default="auto",
                   help="what runs the model; auto (default): onnxruntime, no PyTorch, for an .onnx file, a "
                        "bundled model or a descriptor head; torch for a ResNet18 checkpoint of your own where it "
                        "is installed")
    p.add_argument("--model-threads", type=int,
                   help="the model's threads per server process (default: half of its share of the cores)")
    p.add_argument("--detector", **DETECTOR_OPTION)
    p.add_argument("--min-face", type=float, metavar="PX", help=MIN_FACE_HELP)
    _max_pixels_option(p)
    p.add_argument("--max-memory-mb", type=float,
                   help="uploads and decoded images in flight, in MiB, per server process; a request beyond it is "
                        "answered 503 with Retry-After (default 512)")
    p.add_argument("--body-timeout", type=float,
                   help="seconds for a request's body to arrive; a slower one is answered 408 and its connection "
                        "closed (default 30)")
    p.set_defaults(func=cmd_serve)
    return parser


def _max_pixels_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-pixels", type=int,
                   help="larger images are refused before they are decoded, as decompression bombs "
                        "(default 50000000: a 50-megapixel photo)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options anywhere on the line, between positionals too (``predict RUN --no-detect a.jpg b.jpg``).

    argparse's intermixed parsing does not work through subparsers, so each subcommand parses its own part.
    """
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if argv and argv[0] in commands:
        args = commands[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
        return args
    return parser.parse_args(argv)  # no command, --help or a misspelling: argparse's own message


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _warning_line
    args = parse_args(argv)
    try:
        return args.func(args)
    except MissingExtra as e:
        print(e, file=sys.stderr)
        return 2
    except UserError as e:
        print(f"facegender: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("facegender: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
