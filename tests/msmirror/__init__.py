"""A ModelScope-compatible stand-in on 127.0.0.1 (see server.py)."""
