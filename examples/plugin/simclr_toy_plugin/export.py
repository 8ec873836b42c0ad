"""A JSON export format as a simclr-cli plugin: the encoder's description (what rebuilds it), no weights."""

from __future__ import annotations

import json

from simclr_cli.artifacts import ExportFormat
from simclr_cli.files import atomic_file


def write(loaded, path, options) -> dict:
    description = {"model": loaded.encoder.describe(), "image_size": loaded.image_size}
    with atomic_file(path) as f:  # a temporary file renamed into place: never half written
        f.write(json.dumps(description, indent=2).encode())
    return {"keys": len(description["model"])}


JSON = ExportFormat("json", "json", "the encoder's description as JSON (no weights)", write,
                    lambda encoder, path: f"json.load(open('{path}'))")
