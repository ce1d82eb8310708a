"""The vLLM service: unit and env file rendered from the plan, health gate with rollback (host program: hostprog.py), doctor."""
