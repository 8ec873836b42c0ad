"""ONNX: `simclr extract --format onnx` writes the encoder as one .onnx file (weights inside, the batch axis
dynamic, and the image size too where the model takes any), checked with onnxruntime before it is kept;
`OnnxEncoder` runs such a file for `simclr embed` and `simclr neighbors`, through onnxruntime alone.

The exporter is torch's (`torch.onnx.export`: the torch.export-based one where this torch has it, which
needs onnxscript; the TorchScript-based one before torch 2.5). The extra `onnx` installs onnx, onnxruntime
and onnxscript; without it, one line names it before any work.
"""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import numpy as np
import torch

from simclr_cli.artifacts import Checkpoint, ClassifierFile, EncoderFile, ExportFormat, OnnxExport
from simclr_cli.errors import CheckpointError, MissingExtraError
from simclr_cli.exports import portable
from simclr_cli.files import atomic_path
from simclr_cli.models.encoder_file import LoadedEncoder
from simclr_cli.models.features import preprocess

DYNAMO = "dynamo" in inspect.signature(torch.onnx.export).parameters  # torch.export's exporter: torch 2.5 and later
# what exporting needs: torch.export's exporter writes through onnxscript
NEEDS = ("onnx", "onnxruntime", *(("onnxscript",) if DYNAMO else ()))
FIX = "export the encoder again with `simclr extract --format onnx`"  # what a file whose metadata is refused needs
OPSET = 18  # the default: onnxruntime 1.16 and later run it
MIN_OPSET = 13  # what this exporter path can write (the dynamo exporter wants 18 and converts down)


def require(*modules: str) -> None:
    """Every module named, or one line naming the extra that installs it."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(f"the ONNX format needs {', '.join(missing)}: pip install 'simclr-cli[onnx]'")


def _export(encoder: torch.nn.Module, x: torch.Tensor, path: Path, opset: int, dynamic_size: bool,
            output: str) -> None:
    names = {"input_names": ["images"], "output_names": [output], "opset_version": opset, "verbose": False}
    if DYNAMO:
        dims = {0: torch.export.Dim("batch", min=1, max=65536)}
        if dynamic_size:
            dims.update({2: torch.export.Dim("height", min=8, max=4096), 3: torch.export.Dim("width", min=8, max=4096)})
        one_file = {"external_data": False} if "external_data" in inspect.signature(torch.onnx.export).parameters else {}
        torch.onnx.export(encoder, (x,), str(path), dynamo=True, dynamic_shapes=(dims,), **one_file, **names)
    else:
        axes = {"images": {0: "batch", **({2: "height", 3: "width"} if dynamic_size else {})}, output: {0: "batch"}}
        torch.onnx.export(encoder, (x,), str(path), dynamic_axes=axes, **names)


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return (text[:200] + "...") if len(text) > 200 else text or type(err).__name__


def write(loaded: LoadedEncoder, path: Path, options: dict | None = None) -> dict:
    """Export, stamp the metadata, run it with onnxruntime on `portable.checks`' batches (the parity batch, one
    image, and where height and width are dynamic another size), keep it only within the tolerance.
    options: {"opset": N} (default OPSET)."""
    opset = (options or {}).get("opset", OPSET)
    require(*NEEDS)
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise CheckpointError(f"opset {opset} is not one this exporter writes: use --opset {MIN_OPSET} to {newest}")
    encoder = loaded.encoder.eval().float()
    x, reference = portable.parity_batch(loaded)
    sized = portable.size_batch(loaded)  # None: a ViT's position embeddings (or the model) fix its image size
    with atomic_path(path) as tmp:
        try:
            _export(encoder, x, tmp, opset, sized is not None, portable.output_of(loaded))
        except Exception as err:  # the exporter names the operator or module it could not convert
            raise CheckpointError(f"{encoder.describe()['arch']} could not be exported to ONNX opset {opset} "
                                  f"({type(err).__name__}: {_first_line(err)}): nothing was written") from None
        model = onnx.load(str(tmp))
        entry = model.metadata_props.add()
        entry.key, entry.value = portable.KEY, portable.dumps(loaded)
        onnx.save(model, str(tmp))
        runner = OnnxEncoder(tmp, expect=None)
        # torch.export may fix a size the model reads as a number (int(x.shape[-1])): the file says what it takes
        dynamic_size = sized is not None and not any(isinstance(d, int) for d in runner.input_shape[2:])
        diff = portable.verify(lambda batch: runner.outputs(batch.numpy()),
                               portable.checks(x, reference, sized if dynamic_size else None), "the ONNX file")
    return {"parity": diff, "opset": opset, "dynamic": ["batch", "height", "width"] if dynamic_size else ["batch"]}


class OnnxEncoder:
    """An .onnx file `simclr extract` wrote, run with onnxruntime: what `simclr embed` needs of an encoder."""

    kind = "ONNX file (onnxruntime)"
    head = None

    def __init__(self, path: str | Path, expect: str | None = "h") -> None:
        """expect: the output the caller needs ("h" for embed, neighbors and probe; None: whatever it gives)."""
        require("onnxruntime")
        import onnxruntime

        self.path = Path(path)
        try:
            self.session = onnxruntime.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime's own errors for files it cannot read
            raise CheckpointError(f"{self.path} is not an ONNX model onnxruntime can run ({_first_line(err)})") from None
        inputs = self.session.get_inputs()
        shape = inputs[0].shape if len(inputs) == 1 else []
        if len(inputs) != 1 or len(shape) != 4 or shape[1] != 3:
            got = ", ".join(f"{i.name} {i.shape}" for i in inputs)
            raise CheckpointError(f"{self.path} does not take a batch of RGB images (N, 3, H, W) but {got}: give an "
                                  "ONNX encoder that `simclr extract --format onnx` wrote")
        meta = self.session.get_modelmeta().custom_metadata_map.get(portable.KEY)
        if meta is None:
            raise CheckpointError(f"{self.path} carries no simclr-cli metadata (image size, normalisation): export the "
                                  "encoder with `simclr extract --format onnx`")
        info = portable.read_metadata(meta, str(self.path), FIX)  # every field checked, or one line naming it
        if expect is not None and info["output"] != expect:
            raise CheckpointError(f"{self.path} is an exported classifier (it gives {info['output']}, not h): give the "
                                  "encoder's .onnx, or use the classifier.pth with simclr predict")
        self.input, self.input_shape = inputs[0].name, shape
        self.image_size, self.feature_dim = info["image_size"], info["output_dim"]
        self.mean, self.std = tuple(map(float, info["mean"])), tuple(map(float, info["std"]))
        self.provenance, self.model = info["provenance"], info["model"]
        self.notes = ["ONNX runs in fp32 through onnxruntime whatever --precision says"]
        self._check_graph()

    def _check_graph(self) -> None:
        """The sizes the graph fixes agree with the metadata: the input's height and width, the output's size."""
        fixed = [d for d in self.input_shape[2:] if isinstance(d, int)]
        if any(d != self.image_size for d in fixed):
            raise CheckpointError(f"{self.path}: its {portable.KEY} metadata's 'image_size' is {self.image_size}, but "
                                  f"the model takes {self.input_shape[2]}x{self.input_shape[3]} images: {FIX}")
        out = self.session.get_outputs()[0].shape
        known = isinstance(out, list) and len(out) > 0  # [] or None: the graph does not say; `run` checks
        if known and (len(out) != 2 or (isinstance(out[1], int) and out[1] != self.feature_dim)):
            raise CheckpointError(f"{self.path}: its {portable.KEY} metadata's 'output_dim' is {self.feature_dim}, but "
                                  f"the model gives {out}: {FIX}")

    def describe(self) -> dict:
        """What `simclr probe` shows of an encoder file."""
        return {**self.model, "feature_dim": self.feature_dim, "kind": self.kind, "image_size": self.image_size,
                "mean": list(self.mean), "std": list(self.std), "head_layers": None, "provenance": self.provenance,
                "notes": self.notes}

    def outputs(self, x: np.ndarray) -> np.ndarray:
        """What the graph gives for float32 (B, 3, H, W), unchecked (`write` compares it with PyTorch's)."""
        return self.session.run(None, {self.input: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def run(self, x: np.ndarray) -> np.ndarray:
        """float32 (B, 3, S, S), already normalised -> h (B, feature_dim)."""
        h = self.outputs(x)
        if h.shape != (len(x), self.feature_dim):  # a graph whose output size is not fixed: seen only now
            raise CheckpointError(f"{self.path} gives {h.shape} for {len(x)} images, not (N, output_dim = "
                                  f"{self.feature_dim}) as its {portable.KEY} metadata says: {FIX}")
        return h

    def features(self, images_u8: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float32 h (B, D), preprocessed as `models.features.extract_features` does."""
        x = preprocess(images_u8, self.mean, self.std, self.image_size)
        return torch.from_numpy(self.run(x.numpy()))


def hint(encoder: torch.nn.Module, path: Path) -> str:
    return (f"onnxruntime.InferenceSession('{path}').run(None, {{'images': x}})[0], x float32 (N, 3, H, W) "
            "preprocessed as the file's 'simclr-cli' metadata says (README: Using the encoder elsewhere)")


ONNX = ExportFormat("onnx", "onnx", "for onnxruntime (extra onnx), with the preprocessing inside, checked against "
                    "PyTorch before it is kept", write, hint, takes=(Checkpoint, EncoderFile, ClassifierFile),
                    reads_as=OnnxExport, needs=lambda: require(*NEEDS))
