"""One pyinfra @deploy per step of deploy.py; each reads Settings and calls vllm_fleet."""
