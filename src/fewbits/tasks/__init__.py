"""Built-in real models and data (offline: Debian data packages and PyPI weight wheels)."""
