"""Two edits of an ONNX graph, made with protobuf alone (onnxruntime's own dependency: the inference core has
no `onnx` package).

``stem_over_space_to_depth``: the descriptor network's first convolution, 7 x 7 at stride 2 over three colour
planes, made a 4 x 4 one at stride 1 over a space-to-depth copy of the input (each 2 x 2 block of pixels as 12
channels). The two compute the same sums. MNN runs the second with a Winograd transform, the first directly: on
one core of an AVX2-only AMD EPYC the descriptor network took 3.37-3.44 against 3.93 ms a face in batches of 16,
its first convolution 0.93 ms of it before. onnxruntime ran it slower (7.1 against 6.3 ms a face), so only the
graph MNN converts is edited. The space-to-depth is the input's own transpose from N x H x W x 3 to channels
first, reshaped on both sides: no more data moves than before.

``narrowed``: the zero channels a graph was widened by dropped again where a CPU's vectors are narrower (the
BlazeFace graphs carry multiples of 16 channels, AVX-512's block, in onnxruntime's blocked layout).

``split_shortcuts``: a residual block whose shortcut is widened by a 1 x 1 identity convolution (zero channels
appended; BlazeFace's, as tools/blazeface_to_onnx.py and ``narrowed`` write them) made two convolutions and a
concatenation: the channels the shortcut carries are summed with it, the ones it adds zeros to are not. The same
sums without the identity's multiplications.

Only the fields the edits read or write are declared below (their numbers are onnx.proto's); protobuf keeps
every other field of the file as it read it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

_FLOAT, _INT64 = 1, 7  # TensorProto.DataType
_INT, _INTS = 2, 7  # AttributeProto.AttributeType


def _messages():
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    f = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="facegender_onnx_subset.proto", package="facegender_onnx",
                                              syntax="proto2")

    def message(name: str, *fields: tuple[str, int, int, int, str]) -> None:
        m = file.message_type.add(name=name)
        for field, number, kind, label, type_name in fields:
            m.field.add(name=field, number=number, type=kind, label=label,
                        **({"type_name": f".facegender_onnx.{type_name}"} if type_name else {}))

    one, many = f.LABEL_OPTIONAL, f.LABEL_REPEATED
    message("TensorProto", ("dims", 1, f.TYPE_INT64, many, ""), ("data_type", 2, f.TYPE_INT32, one, ""),
            ("name", 8, f.TYPE_STRING, one, ""), ("raw_data", 9, f.TYPE_BYTES, one, ""))
    message("AttributeProto", ("name", 1, f.TYPE_STRING, one, ""), ("i", 3, f.TYPE_INT64, one, ""),
            ("s", 4, f.TYPE_BYTES, one, ""),
            ("ints", 8, f.TYPE_INT64, many, ""), ("type", 20, f.TYPE_INT32, one, ""))
    message("NodeProto", ("input", 1, f.TYPE_STRING, many, ""), ("output", 2, f.TYPE_STRING, many, ""),
            ("name", 3, f.TYPE_STRING, one, ""), ("op_type", 4, f.TYPE_STRING, one, ""),
            ("attribute", 5, f.TYPE_MESSAGE, many, "AttributeProto"))
    message("Dimension", ("dim_value", 1, f.TYPE_INT64, one, ""), ("dim_param", 2, f.TYPE_STRING, one, ""))
    message("TensorShapeProto", ("dim", 1, f.TYPE_MESSAGE, many, "Dimension"))
    message("TensorTypeProto", ("elem_type", 1, f.TYPE_INT32, one, ""), ("shape", 2, f.TYPE_MESSAGE, one, "TensorShapeProto"))
    message("TypeProto", ("tensor_type", 1, f.TYPE_MESSAGE, one, "TensorTypeProto"))
    message("ValueInfoProto", ("name", 1, f.TYPE_STRING, one, ""), ("type", 2, f.TYPE_MESSAGE, one, "TypeProto"))
    message("GraphProto", ("node", 1, f.TYPE_MESSAGE, many, "NodeProto"),
            ("initializer", 5, f.TYPE_MESSAGE, many, "TensorProto"),
            ("output", 12, f.TYPE_MESSAGE, many, "ValueInfoProto"),
            ("value_info", 13, f.TYPE_MESSAGE, many, "ValueInfoProto"))
    message("ModelProto", ("graph", 7, f.TYPE_MESSAGE, one, "GraphProto"))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"facegender_onnx.{name}"))
            for name in ("ModelProto", "NodeProto", "TensorProto")}


def _read(source: Path | bytes) -> tuple[dict, object | None]:
    """(``_messages()``, the ModelProto of a file or of a serialised graph), the model None where it is not a graph."""
    from google.protobuf.message import DecodeError

    messages = _messages()
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    try:
        return messages, messages["ModelProto"].FromString(data)
    except DecodeError:
        return messages, None


def _float_array(weights: dict, name: str) -> np.ndarray | None:
    """The float32 initializer ``name`` of ``weights`` (name -> TensorProto); None where it is not one, stored
    as raw data."""
    t = weights.get(name)
    if t is None or t.data_type != _FLOAT or not t.raw_data:
        return None
    return np.frombuffer(t.raw_data, "<f4").reshape(tuple(t.dims))


def _stored(graph, name: str, values: np.ndarray):
    """``values`` added to ``graph``'s initializers as the float32 tensor ``name`` (raw data); returns it."""
    values = np.ascontiguousarray(values, "<f4")
    return graph.initializer.add(name=name, dims=list(values.shape), data_type=_FLOAT, raw_data=values.tobytes())


def _int(node, name: str, default: int) -> int:
    found = [a.i for a in node.attribute if a.name == name]
    return found[0] if found else default


def _ints(node, name: str) -> list[int] | None:
    found = [list(a.ints) for a in node.attribute if a.name == name]
    return found[0] if found else None


def stem_over_space_to_depth(source: Path, target: Path, size: int) -> bool:
    """Write ``source`` (a graph whose input, N x ``size`` x ``size`` x 3, is transposed to channels first,
    cast to float and convolved 7 x 7 at stride 2 without padding) to ``target`` with that convolution made a
    4 x 4 one over the input's space-to-depth copy. False, and nothing written, where the graph does not
    start that way."""
    messages, model = _read(source)
    if model is None:  # not a graph: its conversion says so
        return False
    graph = model.graph
    nodes = list(graph.node[:3])
    if (len(nodes) < 3 or [n.op_type for n in nodes] != ["Transpose", "Cast", "Conv"] or size % 2
            or _ints(nodes[0], "perm") != [0, 3, 1, 2] or nodes[1].input[0] != nodes[0].output[0]
            or nodes[2].input[0] != nodes[1].output[0] or _ints(nodes[2], "strides") != [2, 2]
            or any(_ints(nodes[2], "pads") or []) or (_ints(nodes[2], "dilations") or [1, 1]) != [1, 1]
            or any(a.name == "auto_pad" and a.s not in (b"", b"NOTSET") for a in nodes[2].attribute)):
        return False
    transpose, _, conv = nodes
    weights = {t.name: t for t in graph.initializer}
    stem = weights.get(conv.input[1])
    if stem is None or stem.data_type != _FLOAT or len(stem.dims) != 4 or not stem.raw_data:
        return False
    out, planes, k, k2 = stem.dims
    if planes != 3 or k != k2:
        return False
    w = np.frombuffer(stem.raw_data, "<f4").reshape(out, planes, k, k)
    half = (k + 1) // 2
    blocked = np.zeros((out, 4 * planes, half, half), "<f4")  # channel (dy * 2 + dx) * planes + c
    for dy in range(2):
        for dx in range(2):
            part = w[:, :, dy::2, dx::2]
            blocked[:, (dy * 2 + dx) * planes:(dy * 2 + dx + 1) * planes, :part.shape[2], :part.shape[3]] = part
    n = size // 2
    name = conv.input[1] + "_space_to_depth"
    tensors = {f"{name}_blocks": [-1, n, 2, n, 2, planes], f"{name}_planes": [-1, 4 * planes, n, n]}
    for key, shape in tensors.items():
        graph.initializer.add(name=key, dims=[len(shape)], data_type=_INT64, raw_data=np.array(shape, "<i8").tobytes())
    graph.initializer.remove(stem)
    _stored(graph, name, blocked)
    # N x n x 2 x n x 2 x 3 -> N x 2 x 2 x 3 x n x n: the rows' and columns' offsets in a block, then the colour
    Node = messages["NodeProto"]
    reshape = Node(input=[transpose.input[0], f"{name}_blocks"], output=[f"{name}_6d"], name=f"{name}_reshape",
                   op_type="Reshape")
    turn = Node(input=[f"{name}_6d"], output=[f"{name}_turned"], name=f"{name}_transpose", op_type="Transpose")
    turn.attribute.add(name="perm", ints=[0, 2, 4, 5, 1, 3], type=_INTS)
    planar = Node(input=[f"{name}_turned", f"{name}_planes"], output=list(transpose.output), name=f"{name}_planes",
                  op_type="Reshape")
    for a in conv.attribute:
        if a.name == "kernel_shape":
            del a.ints[:]
            a.ints.extend([half, half])
        elif a.name == "strides":
            del a.ints[:]
            a.ints.extend([1, 1])
    conv.input[1] = name
    _replace(graph.node, [reshape, turn, planar, *graph.node[1:]])
    # the shapes recorded for what now has other shapes (the exporter's, where it kept them)
    stale = {transpose.output[0], nodes[1].output[0]}
    _replace(graph.value_info, [v for v in graph.value_info if v.name not in stale])
    Path(target).write_bytes(model.SerializeToString())
    return True


def _replace(field, items: list) -> None:
    """A repeated message field's items replaced by copies of ``items`` (which may be its own)."""
    copies = [type(item).FromString(item.SerializeToString()) for item in items]
    del field[:]
    field.extend(copies)


# AVX2's float32 vector: onnxruntime's blocked layout holds 8 channels a block there (16 with AVX-512)
NARROW_BLOCK = 8


def narrowed(source: Path, block: int = NARROW_BLOCK) -> bytes | None:
    """``source`` with the channels its first convolution leaves zero (zero weights and bias: a graph widened
    for a wider vector block) dropped, to a multiple of ``block``, from the layers after it that keep them
    zero: ReLU, max pooling, sums of such layers, depthwise convolutions adding nothing to them and pointwise
    ones whose outputs' extra channels are zero too. A pointwise convolution that makes them non-zero reads
    the narrow input; any other node reads it padded back by a 1 x 1 convolution (an Identity becomes that
    convolution, which onnxruntime fuses with the sum after it). The same sums, less the zeros; None where
    nothing can be dropped (or the graph is not float32 convolutions stored as raw data)."""
    messages, model = _read(source)
    if model is None:
        return None
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    array = lambda name: _float_array(weights, name)  # noqa: E731

    def stored(name: str, values: np.ndarray) -> str:
        weights[name] = _stored(graph, name, values)
        return name

    def narrowed_weights(node, w: np.ndarray, b: np.ndarray) -> None:
        """``node`` (a convolution) reads ``w`` and ``b``, stored beside its own weights and bias."""
        node.input[1] = stored(f"{node.input[1]}_narrow", w)
        node.input[2] = stored(f"{node.input[2]}_narrow", b)

    nodes = list(graph.node)
    if not nodes or nodes[0].op_type != "Conv" or _int(nodes[0], "group", 1) != 1 or len(nodes[0].input) < 3:
        return None
    stem_w, stem_b = array(nodes[0].input[1]), array(nodes[0].input[2])
    if stem_w is None or stem_b is None:
        return None
    used = np.flatnonzero(np.abs(stem_w).reshape(len(stem_w), -1).max(axis=1) + np.abs(stem_b))
    width = len(stem_w)
    keep = -(-(int(used[-1]) + 1 if len(used) else 1) // block) * block
    if keep >= width:
        return None
    narrow = {nodes[0].output[0]: width}  # tensor -> its width in the source graph (channels from keep on: zero)
    padded: dict[str, str] = {}  # narrow tensor -> its copy padded back to that width
    out = [nodes[0]]
    narrowed_weights(nodes[0], stem_w[:keep], stem_b[:keep])

    def padding(x: str, name: str, output: str):
        eye = np.eye(narrow[x], keep, dtype="<f4")[:, :, None, None]
        node = messages["NodeProto"](input=[x, stored(f"{name}_eye", eye), stored(f"{name}_zero", np.zeros(narrow[x]))],
                                     output=[output], name=name, op_type="Conv")
        node.attribute.add(name="kernel_shape", ints=[1, 1], type=_INTS)
        return node

    for node in nodes[1:]:
        inputs = [x for x in node.input if x in narrow]
        if not inputs:
            out.append(node)
            continue
        op, x = node.op_type, node.input[0]
        w, b = (array(node.input[1]), array(node.input[2])) if op == "Conv" and len(node.input) == 3 else (None, None)
        group = _int(node, "group", 1)
        conv = w is not None and b is not None and inputs == [x]
        channelwise = op in ("Relu", "MaxPool") and inputs == [x]
        same_sum = op == "Add" and inputs == list(node.input) and len({narrow[i] for i in inputs}) == 1
        if channelwise or same_sum:
            narrow[node.output[0]] = narrow[x]
        elif conv and group == narrow[x] and w.shape[1] == 1 and not b[keep:].any():  # depthwise, adding nothing there
            narrowed_weights(node, w[:keep], b[:keep])
            for a in node.attribute:
                if a.name == "group":
                    a.i = keep
            narrow[node.output[0]] = narrow[x]
        elif conv and group == 1 and w.shape[1] == narrow[x]:  # reads the narrow input whatever it writes
            width, w = len(w), w[:, :keep]
            if width > keep and not w[keep:].any() and not b[keep:].any():  # and writes zeros there too
                w, b, narrow[node.output[0]] = w[:keep], b[:keep], width
            narrowed_weights(node, w, b)
        elif op == "Identity":
            node = padding(x, node.name, node.output[0])
        else:
            for i, name in enumerate(node.input):
                if name in narrow:
                    if name not in padded:
                        padded[name] = f"{name}_padded"
                        out.append(padding(name, padded[name], padded[name]))
                    node.input[i] = padded[name]
        out.append(node)
    if any(o.name in narrow for o in graph.output):
        return None
    _replace(graph.node, out)
    read = {x for n in out for x in n.input}
    _replace(graph.initializer, [t for t in graph.initializer if t.name in read])
    _replace(graph.value_info, [v for v in graph.value_info if v.name not in narrow])
    return model.SerializeToString()


def split_shortcuts(data: bytes, block: int = NARROW_BLOCK) -> bytes | None:
    """``data`` (a serialised graph) with every ``Relu(Add(Conv(x), Conv_identity(s)))``, where the identity
    convolution appends zero channels to ``s`` and ``Conv`` is a pointwise convolution, written as
    ``Concat(Relu(Conv_kept(x) + s), Relu(Conv_added(x)))``: ``Conv``'s filters split at ``s``'s width. In
    onnxruntime's blocked layout, where both parts are whole blocks of ``block`` channels, the first is one
    convolution summing into its shortcut and the concatenation moves whole blocks; the identity's multiply-adds
    (an eighth of BlazeFace's) are gone. None where the graph has no such block (or is not a graph)."""
    messages, model = _read(data)
    if model is None:
        return None
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    array = lambda name: _float_array(weights, name)  # noqa: E731

    def pointwise(node) -> tuple[np.ndarray, np.ndarray] | None:
        """A plain 1 x 1 convolution's (weights, bias), or None."""
        if node is None or node.op_type != "Conv" or len(node.input) != 3 or _int(node, "group", 1) != 1:
            return None
        if any(v != 1 for v in (_ints(node, "strides") or [1])) or any(_ints(node, "pads") or []):
            return None
        if any(a.name == "auto_pad" and a.s not in (b"", b"NOTSET") for a in node.attribute):
            return None
        w, b = array(node.input[1]), array(node.input[2])
        if w is None or b is None or w.ndim != 4 or w.shape[2:] != (1, 1) or b.shape != w.shape[:1]:
            return None
        return w, b

    def identity_widening(node) -> tuple[int, int] | None:
        """(the input's width, the output's) where ``node`` copies its input and appends zero channels to it."""
        found = pointwise(node)
        if found is None:
            return None
        w, b = found
        out, width = w.shape[:2]
        copies = np.array_equal(w[:, :, 0, 0], np.eye(out, width, dtype="<f4"))
        return (width, out) if out > width and not b.any() and copies else None

    nodes = list(graph.node)
    made = {x: n for n in nodes for x in n.output}
    readers: dict[str, int] = {}
    for n in nodes:
        for x in n.input:
            readers[x] = readers.get(x, 0) + 1
    relu_of = {n.input[0]: n for n in nodes if n.op_type == "Relu"}
    declared = {v.name: v for v in graph.value_info}
    Node = messages["NodeProto"]
    rewritten: dict[str, list] = {}  # a Relu's output -> the nodes that now make it
    gone: set[str] = set()  # outputs of the nodes removed
    for add in nodes:
        if add.op_type != "Add" or len(add.input) != 2 or add.output[0] not in relu_of:
            continue
        pair = [made.get(x) for x in add.input]
        for widening, conv in (pair, pair[::-1]):
            widths = identity_widening(widening)
            if widths is not None:
                break
        else:
            continue
        width, wide = widths
        found = pointwise(conv) if conv is not widening else None
        relu = relu_of[add.output[0]]
        if (found is None or found[0].shape[0] != wide or width % block or (wide - width) % block
                or any(readers.get(x, 0) != 1 for x in (add.output[0], conv.output[0], widening.output[0]))):
            continue
        w, b = found
        name, shortcut = conv.output[0], widening.input[0]
        parts = []
        for part, rows in (("kept", slice(None, width)), ("added", slice(width, None))):
            for kind, values in (("weights", w[rows]), ("bias", b[rows])):
                _stored(graph, f"{name}_{part}_{kind}", values)
            part_conv = Node(input=[conv.input[0], f"{name}_{part}_weights", f"{name}_{part}_bias"],
                             output=[f"{name}_{part}"], name=f"{conv.name}_{part}", op_type="Conv")
            part_conv.attribute.extend(conv.attribute)
            parts.append(part_conv)
        kept, added = parts
        summed = Node(input=[f"{name}_kept", shortcut], output=[f"{name}_kept_sum"], name=f"{add.name}_kept",
                      op_type="Add")
        relus = [Node(input=[x], output=[f"{x}_relu"], name=f"{relu.name}_{part}", op_type="Relu")
                 for x, part in ((f"{name}_kept_sum", "kept"), (f"{name}_added", "added"))]
        concat = Node(input=[r.output[0] for r in relus], output=list(relu.output), name=f"{relu.name}_concat",
                      op_type="Concat")
        concat.attribute.add(name="axis", i=1, type=_INT)
        rewritten[relu.output[0]] = [kept, summed, relus[0], added, relus[1], concat]
        # the parts' maps declared as the block's, less the other part's channels: where the block's sizes were
        # declared, onnxruntime can still tell that a part and the shortcut it is summed with are the same size
        shape = declared.get(name)
        if shape is not None and len(shape.type.tensor_type.shape.dim) == 4:
            for tensor, channels in ((f"{name}_kept", width), (f"{name}_kept_sum", width), (f"{name}_kept_sum_relu", width),
                                     (f"{name}_added", wide - width), (f"{name}_added_relu", wide - width)):
                info = graph.value_info.add()
                info.CopyFrom(shape)
                info.name = tensor
                info.type.tensor_type.shape.dim[1].Clear()
                info.type.tensor_type.shape.dim[1].dim_value = channels
        gone |= {add.output[0], conv.output[0], widening.output[0]}
    if not rewritten:
        return None
    out = []
    for n in nodes:
        if n.op_type == "Relu" and n.output[0] in rewritten:
            out += rewritten[n.output[0]]
        elif not gone.intersection(n.output):
            out.append(n)
    _replace(graph.node, out)
    read = {x for n in out for x in n.input}
    _replace(graph.initializer, [t for t in graph.initializer if t.name in read])
    _replace(graph.value_info, [v for v in graph.value_info if v.name not in gone])
    return model.SerializeToString()
