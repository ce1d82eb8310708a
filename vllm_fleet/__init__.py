"""vllm-fleet: pure logic behind the pyinfra deploy (settings, hardware, plan, doctor).

Nothing in this package holds pyinfra state; roles/ and deploy.py call into it.
"""

__version__ = "0.1.0"
