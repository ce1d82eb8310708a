"""Programs installed on the hosts: stdlib-only Python 3, no import of vllm_fleet (they run outside the venv)."""
