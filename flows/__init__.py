"""loraline's Prefect flows (wiring only; the library is :mod:`loraline`, which never imports this package).

This folder is installed as the package ``loraline_flows`` (pyproject.toml's package-dir), never as a top-level
``flows`` that another distribution could shadow or be shadowed by: import ``loraline_flows.release`` etc."""
