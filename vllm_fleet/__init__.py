"""vllm-fleet: pure logic behind the pyinfra deploy (settings, hardware, plan, doctor).

Nothing in this package holds pyinfra state; deploy.py calls each capability's step.
"""

__version__ = "0.1.0"
