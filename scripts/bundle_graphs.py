"""Write the ONNX graphs that the package ships beside its bundled models, so the inference core runs them
with onnxruntime alone and the first run converts nothing:

- ``weights/dlib_face_recognition_resnet_model_v1.onnx``: dlib's face-recognition network, chips ->
  descriptor, float32 (every descriptor head runs on it);
- ``weights/facegender-resnet18.onnx``: the bundled ResNet18 as ``facegender export`` writes it, its float16
  weights stored as float16 (half the file; the same float32 arithmetic).

Run after changing a bundled model or the exporter (needs the training extra):
    python scripts/bundle_graphs.py
tests/test_core.py checks that the shipped graphs give the PyTorch path's answers.
"""
from __future__ import annotations

from facegender import checkpoint
from facegender.inference import BUNDLED_GRAPHS, BUNDLED_MODELS
from facegender.io import atomic_path
from facegender.onnx_export import descriptor_network_graph, half_stored, to_onnx
from facegender.onnx_model import DESCRIPTOR_NETWORK
from facegender.torchmodels import build_torch_face_model


def main() -> None:
    with atomic_path(DESCRIPTOR_NETWORK) as tmp:
        tmp.write_bytes(descriptor_network_graph())
    print(f"wrote {DESCRIPTOR_NETWORK} ({DESCRIPTOR_NETWORK.stat().st_size / 2**20:.1f} MiB)")
    for source, graph in BUNDLED_GRAPHS.items():
        tensors, meta = checkpoint.load_torch(source)
        name = next(k for k, v in BUNDLED_MODELS.items() if v == source)
        meta = meta | {"export": meta.get("export", {}) | {"format": "onnx", "from": source.name}}
        data = half_stored(to_onnx(build_torch_face_model(tensors, meta, "cpu", "fp32"), meta, optimize=False))
        with atomic_path(graph) as tmp:
            tmp.write_bytes(data)
        print(f"wrote {graph} ({graph.stat().st_size / 2**20:.1f} MiB, bundled model {name!r})")


if __name__ == "__main__":
    main()
