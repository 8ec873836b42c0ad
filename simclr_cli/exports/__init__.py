"""The exports wing: how a trained encoder leaves. `extract.py` is `simclr extract`: it reads a checkpoint,
encoder file or classifier and writes it in a format of registry.EXPORTS (each an `artifacts.ExportFormat`:
native, torchvision and timm state dicts there, `onnx.py`, TorchScript and safetensors in
`portable_files.py`); `portable.py` is what every portable file carries and the parity check against
PyTorch each one passes before it is written.

A new export format: a file here or in a plugin package with its `ExportFormat`, one line in
registry.EXPORTS (or an entry point in `simclr_cli.exports`), and its tests (copy tests/test_artifacts.py's
toy format)."""
