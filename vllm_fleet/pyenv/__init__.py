"""The Python env: uv and one verified venv per vLLM version and torch backend (host program: hostprog.py)."""
