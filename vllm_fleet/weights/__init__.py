"""Model weights: sources, the detached resumable download unit (host program: hostprog.py), verification."""
