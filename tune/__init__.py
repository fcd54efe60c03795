"""The built-in search spaces of ``cicl tune --space NAME``: installed as the package data
``cicl.spaces`` (pyproject.toml maps this folder to that name), read with importlib.resources."""
