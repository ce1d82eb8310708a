"""The pinned versions, in one place.

VLLM_VERSION is the vLLM release the planner's arithmetic is read from, the
default `vllm_version` of a deploy, and the version CI checks rendered argv
against. Change it here (one line) to move the whole toolkit to another vLLM.
"""

VLLM_VERSION = "0.25.0"
