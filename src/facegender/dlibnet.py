"""dlib's face-descriptor ResNet in PyTorch, its weights read from dlib's own model file.

dlib's ``face_recognition_model_v1`` maps an aligned 150x150 face chip to a 128-D descriptor, one chip
at a time on the CPU. ``DescriptorNet`` is the same network (``anet_type`` of dlib's
examples/dnn_face_recognition_ex.cpp) as a torch module, so descriptors come in batches, channels-last,
in bfloat16 where the CPU has it, or on a GPU; dlib itself is needed only to cut the chips.

    net = DescriptorNet.from_dat()                    # the face-recognition-models package's model file
    chips = chips.face_chips(rgb, [chips.full_object_detection(box, five_points)])
    net.descriptors(chips)                            # N x 128 float32, as dlib's compute_face_descriptor

The .dat file is read by following dlib's serialisation (dlib/serialize.h, dlib/dnn/core.h, layers.h,
input.h, loss.h, cuda/tensor.h) for exactly this network: every layer's version string, hyper-parameters
and tensor shape is checked, so a truncated, corrupt or different file stops with a UserError naming it.
The converted weights are cached under ``io.cache_dir()`` as safetensors, keyed by the file's hash.
"""
from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .chips import CHIP_SIZE, DESCRIPTOR_SIZE, MODEL_FILE
from .detect import MODELS_HINT, packaged_model
from .io import UserError, atomic_path, cache_dir, used_cache_entry
from .runtime import resolve_device, resolve_precision

CONVERTER_VERSION = 1  # part of the cache key: bump when the conversion changes

# Residual stages from the input up: (channels, blocks); the first block of every stage but the first
# is dlib's residual_down (stride 2, avg_pool shortcut). alevel4 .. alevel0 of anet_type.
STAGES = ((32, 3), (64, 4), (128, 3), (256, 3), (256, 1))


# ----------------------------------------------------------------------------------------------------
# The network


class _Residual(nn.Module):
    """dlib's ``ares`` (stride 1) or ``ares_down`` (stride 2), with each affine folded into its conv.

    dlib pads a convolution only where its stride is 1, so the stride-2 conv is unpadded, and its
    ``add_prev`` adds tensors of different shapes over their common top-left corner, zero elsewhere:
    the avg-pooled shortcut can have fewer channels (32 -> 64) or more rows (4x4 against 3x3).
    """

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.down = stride != 1
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, padding=0 if self.down else 1)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(F.relu(self.conv1(x)))
        if not self.down:
            return F.relu(x + y)
        return F.relu(_add_prev(F.avg_pool2d(x, 2, 2), y))


def _add_prev(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    shape = [max(u, v) for u, v in zip(a.shape, b.shape)]

    def grown(t):
        pads = []
        for dim in (3, 2, 1):  # F.pad lists the last dimension first
            pads += [0, shape[dim] - t.shape[dim]]
        return F.pad(t, pads) if any(pads) else t

    return grown(a) + grown(b)


class DescriptorNet(nn.Module):
    """N x 150 x 150 x 3 uint8 RGB chips -> N x 128 descriptors (dlib's ``anet_type``, affines folded)."""

    def __init__(self):
        super().__init__()
        self.pixel_mean = (0.0, 0.0, 0.0)  # RGB, from the model file: dlib subtracts it and divides by 256
        self.stem = nn.Conv2d(3, 32, 7, 2)  # unpadded: dlib pads only stride-1 convolutions
        blocks, cin = [], 32
        for i, (channels, count) in enumerate(STAGES):
            for j in range(count):
                blocks.append(_Residual(cin, channels, 2 if i > 0 and j == 0 else 1))
                cin = channels
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(256, DESCRIPTOR_SIZE, bias=False)
        self.precision = "fp32"
        self.eval()

    @property
    def name(self) -> str:
        """Names its descriptors (facegender.descriptors caches them under it): bf16 ones differ from fp32's."""
        return f"dlibnet-{self.precision}"

    def __call__(self, chips):
        """A tensor goes through the module as usual; a numpy array of chips gets ``descriptors``, so the
        net is a descriptor extractor as facegender.descriptors calls one (chips in, numpy out)."""
        if isinstance(chips, np.ndarray):
            return self.descriptors(chips)
        return super().__call__(chips)

    @property
    def dtype(self) -> torch.dtype:
        return self.stem.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.stem.weight.device

    def forward(self, chips: torch.Tensor) -> torch.Tensor:
        # NHWC uint8 seen as NCHW is already channels-last in memory: no copy
        mean = torch.tensor(self.pixel_mean, device=chips.device).view(1, 3, 1, 1)
        x = ((chips.permute(0, 3, 1, 2).float() - mean) / 256).to(self.dtype)  # normalised in float32
        x = F.max_pool2d(F.relu(self.stem(x)), 3, 2)  # unpadded: stride 2
        x = self.blocks(x)
        return self.fc(x.mean(dim=(2, 3)))

    @classmethod
    def from_dat(cls, path: str | Path | None = None, device: str = "auto",
                 precision: str = "auto") -> "DescriptorNet":
        """The network of a dlib .dat file (None: the face-recognition-models package's), ready to run.

        ``precision``: auto (bf16 on a CPU with native bf16 or a GPU that has it, else fp32), fp32, bf16
        or fp16.
        """
        path = packaged_model(MODEL_FILE) if path is None else Path(path)
        state = dict(converted_state(path))
        with torch.device("meta"):  # no random initialisation of weights about to be replaced
            net = cls()
        net.pixel_mean = tuple(state.pop("pixel_mean").tolist())
        net.load_state_dict(state, assign=True)
        dev = resolve_device(device)
        net.precision = resolve_precision(precision, dev)
        dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
        if net.precision not in dtypes:
            raise UserError(f"precision {precision!r}: use auto, fp32, bf16 or fp16")
        return net.to(device=dev, dtype=dtypes[net.precision], memory_format=torch.channels_last)

    @torch.inference_mode()
    def descriptors(self, chips: np.ndarray | torch.Tensor, batch_size: int = 64) -> np.ndarray:
        """N x 128 float32 descriptors of N x 150 x 150 x 3 uint8 RGB chips (as ``chips.face_chips`` makes)."""
        chips = torch.as_tensor(chips)
        if chips.dtype != torch.uint8 or chips.ndim != 4 or tuple(chips.shape[1:]) != (CHIP_SIZE, CHIP_SIZE, 3):
            raise UserError(f"face chips must be N x {CHIP_SIZE} x {CHIP_SIZE} x 3 uint8 RGB (dlib.get_face_chip, "
                            f"size {CHIP_SIZE}); got {tuple(chips.shape)} {chips.dtype}")
        out = [self(chips[i:i + batch_size].to(self.device)).float().cpu()
               for i in range(0, len(chips), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, DESCRIPTOR_SIZE), np.float32)


# ----------------------------------------------------------------------------------------------------
# Reading dlib's serialisation


class _Reader:
    """dlib's serialize.h encodings over the bytes of one file; every failure is a UserError naming it."""

    def __init__(self, data: bytes, path: Path):
        self.data, self.path, self.pos = memoryview(data), path, 0

    def fail(self, what: str) -> UserError:
        return UserError(f"{self.path}: not dlib's face recognition ResNet model ({what}, at byte {self.pos}); "
                         f"use the {MODEL_FILE} of face-recognition-models ({MODELS_HINT})")

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise self.fail(f"the file ends early: {len(self.data)} bytes; it is truncated")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def int(self) -> int:
        # a control byte (bit 7: negative, bits 0-3: byte count, bits 4-6 always 0), then little-endian bytes
        control = self.take(1)[0]
        if control & 0x70 or (control & 0x0F) > 8:
            raise self.fail(f"bad integer control byte 0x{control:02x}")
        value = int.from_bytes(self.take(control & 0x0F), "little")
        return -value if control & 0x80 else value

    def float(self) -> float:
        # float_details: a 64-bit mantissa and a 16-bit exponent, each an integer as above
        if self.pos < len(self.data) and self.data[self.pos] & 0x70:
            raise self.fail("a number in dlib's old text encoding; re-save the model with dlib 19 or later")
        mantissa, exponent = self.int(), self.int()
        specials = {32000: math.inf, 32001: -math.inf, 32002: math.nan}
        return specials[exponent] if exponent in specials else math.ldexp(mantissa, exponent)

    def bool(self) -> bool:
        ch = bytes(self.take(1))
        if ch not in (b"0", b"1"):
            raise self.fail(f"bad boolean {ch!r}")
        return ch == b"1"

    def string(self) -> str:
        n = self.int()
        if not 0 <= n <= 64:  # the only strings here are version tags
            raise self.fail(f"implausible string length {n}")
        return bytes(self.take(n)).decode("latin-1")

    def tag(self, *versions: str) -> str:
        found = self.string()
        if found not in versions:
            raise self.fail(f"found layer version {found!r} where {' or '.join(map(repr, versions))} belongs")
        return found

    def version(self, what: str, *allowed: int) -> int:
        v = self.int()
        if v not in allowed:
            raise self.fail(f"{what} version {v}, expected {' or '.join(map(str, allowed))}")
        return v

    def shape(self) -> tuple[int, int, int, int]:
        dims = tuple(self.int() for _ in range(4))
        if any(d < 0 for d in dims):
            raise self.fail(f"negative tensor shape {dims}")
        return dims

    def tensor(self) -> np.ndarray:
        # resizable_tensor: version 2, n k nr nc, then raw little-endian float32 (not dlib's float encoding)
        self.version("tensor", 2)
        dims = self.shape()
        count = math.prod(dims)
        return np.frombuffer(self.take(4 * count), dtype="<f4").reshape(dims)

    def alias(self) -> tuple[int, int, int, int]:
        self.version("alias_tensor", 1)
        return self.shape()

    def expect(self, what: str, found, wanted) -> None:
        if found != wanted:
            raise self.fail(f"{what} is {found}, expected {wanted}")


@dataclass
class _Layer:
    """One step of the network from the input up; ``params`` holds the tensors of con, affine and fc."""

    kind: str  # con, affine, relu, max_pool, avg_pool, add_prev, fc, tag, skip
    args: tuple = ()
    params: dict[str, np.ndarray] = field(default_factory=dict)


def _architecture() -> list[_Layer]:
    """anet_type, from the input up (dlib writes it outermost first: see _read_network)."""
    def block(n, stride):  # block<N, affine, stride, SUBNET>
        return [_Layer("con", (n, 3, stride)), _Layer("affine"), _Layer("relu"), _Layer("con", (n, 3, 1)),
                _Layer("affine")]

    layers = [_Layer("con", (32, 7, 2)), _Layer("affine"), _Layer("relu"), _Layer("max_pool", (3, 2))]
    for i, (channels, count) in enumerate(STAGES):
        for j in range(count):
            if i > 0 and j == 0:  # residual_down: add_prev2<avg_pool<2,2,2,2,skip1<tag2<block<tag1>>>>>
                layers += [_Layer("tag", (1,)), *block(channels, 2), _Layer("tag", (2,)), _Layer("skip", (1,)),
                           _Layer("avg_pool", (2, 2)), _Layer("add_prev", (2,)), _Layer("relu")]
            else:  # residual: add_prev1<block<tag1>>
                layers += [_Layer("tag", (1,)), *block(channels, 1), _Layer("add_prev", (1,)), _Layer("relu")]
    return layers + [_Layer("avg_pool", (0, 1)), _Layer("fc", (DESCRIPTOR_SIZE,))]


def _read_details(r: _Reader, layer: _Layer, channels_in: int) -> int:
    """Read one layer's own record into ``layer``; returns the channels it outputs."""
    kind = layer.kind
    if kind == "con":
        r.tag("con_4")
        params = r.tensor()
        filters, size, stride = layer.args
        got = (r.int(), r.int(), r.int(), r.int(), r.int())
        r.expect("con_ num_filters, nr, nc, stride_y, stride_x", got, (filters, size, size, stride, stride))
        pad = size // 2 if stride == 1 else 0
        r.expect("con_ padding", (r.int(), r.int()), (pad, pad))
        w_shape, b_shape = r.alias(), r.alias()
        r.expect("con_ filter shape", w_shape, (filters, channels_in, size, size))
        r.expect("con_ bias shape", b_shape, (1, filters, 1, 1))
        r.expect("con_ parameter count", params.size, math.prod(w_shape) + filters)
        for _ in range(4):  # learning-rate and weight-decay multipliers
            r.float()
        flat = params.reshape(-1)
        layer.params = {"weight": flat[:-filters].reshape(w_shape), "bias": flat[-filters:]}
        return filters
    if kind == "affine":
        r.tag("affine_")
        params = r.tensor()
        gamma, beta = r.alias(), r.alias()
        r.expect("affine_ gamma and beta shapes", (gamma, beta), ((1, channels_in, 1, 1),) * 2)
        r.expect("affine_ mode (0: per channel)", r.int(), 0)
        r.expect("affine_ parameter count", params.size, 2 * channels_in)
        flat = params.reshape(-1)
        layer.params = {"gamma": flat[:channels_in], "beta": flat[channels_in:]}
        return channels_in
    if kind in ("max_pool", "avg_pool"):
        r.tag(f"{kind}_2")
        size, stride = layer.args
        got = tuple(r.int() for _ in range(6))
        r.expect(f"{kind}_ nr, nc, stride_y, stride_x, padding_y, padding_x", got, (size, size, stride, stride, 0, 0))
        return channels_in
    if kind in ("relu", "add_prev"):
        r.tag(f"{kind}_")
        return channels_in
    if kind == "fc":
        r.tag("fc_2")
        (outputs,) = layer.args
        r.expect("fc_ outputs and inputs", (r.int(), r.int()), (outputs, channels_in))
        params = r.tensor()
        weights, _biases = r.alias(), r.alias()
        r.expect("fc_ weight shape", weights, (channels_in, outputs, 1, 1))
        r.expect("fc_ bias mode (1: no bias)", r.int(), 1)
        r.expect("fc_ parameter count", params.size, channels_in * outputs)
        for _ in range(4):
            r.float()
        layer.params = {"weight": params.reshape(channels_in, outputs)}
        return outputs
    raise AssertionError(kind)


def _read_network(data: bytes, path: Path) -> tuple[list[_Layer], np.ndarray]:
    """The layers of anet_type with their tensors, and the input's per-channel pixel means (RGB).

    dlib writes add_loss_layer<loss, subnet> as its version, the loss, then the subnet; each add_layer
    as its version, its subnet, its own record, then run-time state; tag and skip layers as their version
    and subnet. So the file holds the versions outermost first, then the records from the input up.
    """
    r = _Reader(data, path)
    layers = _architecture()
    r.version("add_loss_layer", 1)
    r.tag("loss_metric_2")
    r.float(), r.float()  # margin, distance threshold: training only
    for layer in reversed(layers[1:]):
        r.version(f"{layer.kind} layer", 1 if layer.kind in ("tag", "skip") else 2)
    input_version = r.version("input add_layer", 2, 3)
    r.tag("input_rgb_image_sized")
    mean = np.array([r.float(), r.float(), r.float()], dtype=np.float32)
    r.expect("input size", (r.int(), r.int()), (CHIP_SIZE, CHIP_SIZE))
    channels, stack = 3, []  # the channels at each tag1 / tag2, for the layers' shapes
    for index, layer in enumerate(layers):
        if layer.kind == "tag":
            stack.append(channels)
            continue
        if layer.kind == "skip":  # back to the input of the block, whose channels tag1 recorded
            shortcut_channels = stack[-2]
            stack[-2:] = [channels]
            channels = shortcut_channels
            continue
        if layer.kind == "add_prev":
            channels = max(channels, stack.pop())
        channels = _read_details(r, layer, channels)
        _read_run_state(r, first=index == 0, input_version=input_version)
    if r.pos != len(r.data):
        raise r.fail(f"{len(r.data) - r.pos} bytes left after the last layer")
    return layers, mean


def _read_run_state(r: _Reader, first: bool, input_version: int) -> None:
    """What add_layer writes after a layer's record: flags and buffers of a training run, unused here."""
    for _ in range(3):  # this_layer_setup_called, gradient_input_is_stale, get_output_and_gradient_input_disabled
        r.bool()
    r.tensor(), r.tensor(), r.tensor()  # x_grad, cached_output, then params_grad (grad_final on the input layer)
    if first and input_version == 3:
        r.int()  # sample_expansion_factor


def _state_from_layers(layers: list[_Layer], mean: np.ndarray) -> dict[str, torch.Tensor]:
    """DescriptorNet's state dict: each affine (x * gamma + beta, per channel) folded into its conv."""
    convs, fc = [], None
    for layer, after in zip(layers, layers[1:] + [None]):
        if layer.kind == "con":
            gamma, beta = after.params["gamma"], after.params["beta"]
            weight = layer.params["weight"] * gamma[:, None, None, None]
            convs.append((weight, layer.params["bias"] * gamma + beta))
        elif layer.kind == "fc":
            fc = layer.params["weight"].T
    names = ["stem"] + [f"blocks.{i}.conv{j}" for i in range(sum(n for _, n in STAGES)) for j in (1, 2)]
    state = {"pixel_mean": torch.from_numpy(mean), "fc.weight": torch.from_numpy(np.ascontiguousarray(fc))}
    for name, (weight, bias) in zip(names, convs, strict=True):
        state[f"{name}.weight"] = torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32))
        state[f"{name}.bias"] = torch.from_numpy(np.ascontiguousarray(bias, dtype=np.float32))
    return state


def _dat_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read the dlib model ({e.strerror}); pass the path of {MODEL_FILE}") from None


def read_dat(path: str | Path) -> dict[str, torch.Tensor]:
    """DescriptorNet's float32 state dict, parsed from a dlib .dat file (no cache)."""
    path = Path(path)
    return _state_from_layers(*_read_network(_dat_bytes(path), path))


def converted_state(path: str | Path) -> dict[str, torch.Tensor]:
    """``read_dat``, cached as safetensors under the cache dir, keyed by the .dat file's SHA-256."""
    path = Path(path)
    data = _dat_bytes(path)
    digest = hashlib.sha256(data).hexdigest()[:24]
    cached = cache_dir() / "dlibnet" / f"{digest}-v{CONVERTER_VERSION}.safetensors"
    if cached.is_file():
        try:
            return load_file(used_cache_entry(cached, "*.safetensors"))
        except (SafetensorError, OSError, struct.error):
            pass  # a damaged cache entry is rebuilt below
    state = _state_from_layers(*_read_network(data, path))
    with atomic_path(cached) as tmp:
        save_file(state, tmp, metadata={"source": path.name, "sha256": digest, "converter": str(CONVERTER_VERSION)})
    used_cache_entry(cached, "*.safetensors")  # earlier converters' copies, unused for a month, go
    return state
