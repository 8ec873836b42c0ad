"""An example simclr-cli plugin: a method (`method.py`), a data source (`source.py`), an export format
(`export.py`) and an evaluation (`evaluation.py`), each one file, registered by the entry points in
pyproject.toml; nothing in simclr_cli/ names them."""
