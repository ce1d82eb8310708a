"""Every tunable of vllm-fleet, one commented line each, with its default.

Override per group in group_data/<group>.py (the inventory file's name is a
group: inventory/prod.py -> group_data/prod.py) or per host in the inventory.
Unknown `vllm_` keys are an error (with the closest match), so typos cannot
silently fall back to a default. Secrets come from the environment, never
from a committed file.

The lines are grouped by settings section, one `# --- <section> (<module>) ---`
header each, in the order of vllm_fleet.settings.SECTIONS: the module is where the
section's fields and checks are defined (a unit test keeps each line under its
section's header).
"""

import os

from pydantic import SecretStr  # secrets stay masked in host data, which `pyinfra --debug` prints

from vllm_fleet.versions import VLLM_VERSION

# --- core (vllm_fleet/settings.py) ---
# what several capabilities share
vllm_model = "minimax-m2"                # model profile in models/*.yaml, or a local dir holding config.json
vllm_gpus = None                         # GPU indices to use, e.g. [1, 3, 4, 5] -> CUDA_VISIBLE_DEVICES; None = all
vllm_version = VLLM_VERSION              # vLLM release to install (the pin in vllm_fleet/versions.py)
vllm_service_name = "vllm"               # systemd unit name (vllm.service)
vllm_base_dir = "/opt/vllm-fleet"        # venvs and helper programs
vllm_data_dir = "/var/lib/vllm-fleet"    # weights, compile cache, state
vllm_advertise_address = None            # address other hosts (router, Prometheus, cluster peers) reach vLLM at; None = vllm_bind_host if one specific address, else ssh_hostname / the inventory name

# --- serve options (vllm_fleet/planner/options.py) ---
# one line per row, the row's description as comment; the planner decides what is left as None / "auto"
vllm_served_model_name = None            # name clients send as "model"; None = the profile name
vllm_tensor_parallel_size = None         # TP size; None = the planner picks (all selected GPUs / (PP x DP))
vllm_pipeline_parallel_size = 1          # PP size (layers split across GPUs / nodes)
vllm_data_parallel_size = 1              # DP size (replicas; with expert parallel for MoE: DP+EP)
vllm_enable_expert_parallel = None       # expert parallel for MoE; None = the planner's layout rules decide
vllm_max_model_len = "auto"              # context length to serve; "auto" = the largest that fits in the KV cache
vllm_gpu_memory_utilization = 0.9        # fraction of each GPU's memory vLLM may use (lower it if others share the GPU)
vllm_kv_cache_memory_bytes = None        # fixed KV cache bytes per GPU (vLLM semantics; overrides gpu_memory_utilization for KV)
vllm_kv_cache_dtype = "auto"             # KV cache dtype: auto (the model's dtype) | bf16 | fp8 (halves KV memory, small quality cost)
vllm_block_size = None                   # KV cache block size in tokens (a power of two); None = vLLM's default
vllm_max_num_seqs = None                 # most sequences per batch; None = vLLM's default for the GPU
vllm_max_num_batched_tokens = None       # most tokens per batch; None = vLLM's default for the GPU
vllm_enforce_eager = False               # True = no CUDA graphs / torch.compile (faster start, slower serving)
vllm_reasoning_parser = None             # reasoning parser; None = the profile's default (minimax_m2_append_think keeps <think> in content)
vllm_cudagraph_piecewise = False         # True = --compilation-config {"cudagraph_mode": "PIECEWISE"} (fixes "CUDA error: an illegal memory access")
vllm_nvlink_multicast = True             # NVLink multicast as NCCL, PyTorch, NVSHMEM and vLLM choose; False = off (NCCL_NVLS_ENABLE=0 and 3 more variables) where it fails, docs/planner.md
vllm_flashinfer_sampler = True           # top-k/top-p sampler as vLLM chooses; False = VLLM_USE_FLASHINFER_SAMPLER=0, the PyTorch sampler (a venv without FlashInfer)
vllm_bind_host = "127.0.0.1"             # address vLLM listens on; anything but loopback requires vllm_api_key
vllm_port = 8100                         # TCP port vLLM listens on (preflight fails if another process owns it)
vllm_api_key = SecretStr(os.environ["VLLM_FLEET_API_KEY"]) if os.environ.get("VLLM_FLEET_API_KEY") else None  # API key clients must send; lives only in the service's root-only (0600) EnvironmentFile, never in argv or logs
vllm_hf_token = SecretStr(os.environ["VLLM_FLEET_HF_TOKEN"]) if os.environ.get("VLLM_FLEET_HF_TOKEN") else None  # Hugging Face token for gated repos; lives only in an EnvironmentFile (same handling)

# --- preflight (vllm_fleet/preflight/settings.py) ---
vllm_disk_headroom_gib = 20              # free disk required beyond venv + weights
vllm_supported_os = {"ubuntu": ["22.04", "24.04"], "debian": ["12"]}  # OS id -> VERSION_IDs accepted

# --- account (vllm_fleet/account/settings.py) ---
vllm_service_user = "vllm"               # unprivileged system user running vLLM
vllm_adopt_existing_user = False         # True = take over an existing account of that name vllm-fleet did not create (preflight refuses it otherwise)

# --- pyenv (vllm_fleet/pyenv/settings.py) ---
vllm_python_version = "3.12"             # Python of the service venv (uv provides it if the OS lacks it)
vllm_channel = "release"                 # release | nightly | source
vllm_source_url = None                   # git URL of vLLM for channel "source"
vllm_source_ref = None                   # commit/tag/branch for channel "source"
vllm_torch_backend = "auto"              # auto (from the driver's CUDA) | cu126 | cu128 | cu130 | cpu
vllm_index_url = None                    # package index mirror; None = PyPI
vllm_extra_index_urls = []               # extra package indexes
vllm_find_links = []                     # wheel directories / URLs (air-gapped hosts)
vllm_keep_venvs = 2                      # venvs kept for rollback; older ones are pruned
vllm_torch_version = None                # torch to pin, e.g. "2.11.0"; None = what the vLLM release requires
vllm_torch_index_url = None              # torch builds index (mirror of download.pytorch.org/whl/cuXXX); None = uv --torch-backend
vllm_nightly_index_url = "https://wheels.vllm.ai/nightly"  # extra index for vllm_channel = "nightly"
vllm_no_index = False                    # True = only vllm_find_links / vllm_wheelhouse, never an index
vllm_wheelhouse = None                   # wheel dir on the control machine, pushed to the host, installed with --no-index (air-gapped)
vllm_purge_venvs = False                 # uninstall.py: also delete the venvs (default: keep them)

# --- weights (vllm_fleet/weights/settings.py) ---
vllm_weights_sources = None              # [{"kind": "hf"|"modelscope"|"local", "repo", "endpoint", "revision", "path"}], tried in order; None = local model dir copied / vLLM fetches
vllm_weights_wait = True                 # deploy waits for the download unit with a progress line; False = start it and go on
vllm_weights_wait_timeout_s = 21600      # deploy's wait for the download (the unit keeps going; a rerun attaches)
vllm_weights_stall_s = 300               # deploy's wait restarts the download unit after this long without a byte (it resumes)
vllm_weights_restarts = 3                # restarts of a dead or stalled download unit before the wait stops with its last log lines
vllm_weights_retries = 5                 # attempts per source before the next source
vllm_weights_backoff_s = 10.0            # wait before a source's 2nd attempt; doubles each time, max 300 s
vllm_weights_workers = 8                 # files downloaded in parallel
vllm_weights_reverify = False            # True = hash every file again (in parallel) on each deploy that sets it (normally: only changed files)
vllm_hf_xet = False                      # huggingface_hub Xet storage; off because HF mirrors serve plain resolve URLs only
vllm_purge_weights = False               # uninstall.py: also delete weights and caches (default: keep them)

# --- service (vllm_fleet/service/settings.py) ---
vllm_adopt_existing_unit = False         # True = take over an existing unit of vllm_service_name vllm-fleet did not render (preflight refuses it otherwise)
vllm_restart_sec = 10                    # RestartSec: wait before systemd restarts vLLM (Restart=always: also after exit 0); backs off on systemd >= 254
vllm_restart_max_delay_s = 300           # RestartMaxDelaySec: the backoff's longest wait (systemd >= 254; older ones wait vllm_restart_sec every time)
vllm_watchdog = True                     # <service>-watchdog.service: a 1-token completion every interval; restarts a hung engine (/health stays 200)
vllm_watchdog_interval_s = 30            # seconds between watchdog probes
vllm_watchdog_deadline_s = 30            # a probe without an answer within this many seconds is a miss
vllm_watchdog_misses = 3                 # consecutive misses before the watchdog restarts the service
vllm_reap_gpu_leftovers = True           # before each start: end GPU processes this service left behind; refuse while another program holds its GPUs
vllm_health_timeout_s = None             # health-gate wait after a restart; None = scaled to the weights size
vllm_gate_stability_s = 5                # after the gate's checks, seconds /health must stay 200 with the unit's MainPID and NRestarts unchanged
vllm_extra_args = []                     # extra `vllm serve` flags the plan does not own, e.g. ["--enable-prefix-caching"]
vllm_extra_env = {}                      # extra non-secret service environment, e.g. {"SAFETENSORS_FAST_GPU": "1"}

# --- router (vllm_fleet/router/settings.py) ---
# Read on the hosts of the inventory group `routers` only (docs/router.md).
vllm_router_model = None                 # served model name the router routes; None = the one model the fleet serves
vllm_router_replicas = None              # inventory host names behind the router; None = every host serving vllm_router_model
vllm_router_port = 8000                  # port clients reach the router at: its key-checking front (nginx)
vllm_router_bind_host = "127.0.0.1"      # where the front listens; anything but loopback requires a router key
vllm_router_api_key = SecretStr(os.environ["VLLM_FLEET_ROUTER_API_KEY"]) if os.environ.get("VLLM_FLEET_ROUTER_API_KEY") else None  # key clients send to the router; None = the host's vllm_api_key; only in the front's root-only config
vllm_router_internal_port = 8002         # vllm-router itself, on loopback behind the front (its /add_worker, /remove_worker take no key)
vllm_router_metrics_port = 8001          # the router's Prometheus /metrics
vllm_router_policy = "cache_aware"       # cache_aware: a prompt goes to the replica that served its prefix (prefix-cache reuse) unless load is uneven
vllm_router_health_interval_s = 5        # seconds between the router's health checks of each replica
vllm_router_probe_interval_s = 10       # seconds between the router host's 1-token completion probes of each replica
vllm_router_probe_deadline_s = 30       # a probe not answered within this many seconds is a miss
vllm_router_probe_misses = 2            # misses in a row take a replica out of rotation (a hung engine keeps /health 200); an answer puts it back
vllm_router_version = "0.1.17"           # vllm-router release in the router's own venv
vllm_rolling_batch = 1                   # replicas a rolling change restarts at once (each drained at its router first)
vllm_rolling_drain_timeout_s = 60        # a rolling change waits this long at most for a drained replica's requests in flight

# --- cluster (vllm_fleet/cluster/settings.py) ---
# One model across several hosts (docs/multi-node.md): give the hosts of one inventory group the same vllm_cluster.
vllm_cluster = None                      # cluster this host is a node of; None = serves alone
vllm_cluster_rank = None                 # node rank: 0 = the head (serves the API), 1..N-1 = headless workers
vllm_cluster_port = 29501                # rendezvous port on the head every worker connects to (--master-port)
vllm_cluster_address = None              # this host's IP on the private cluster network (VLLM_HOST_IP; the head's is --master-addr)
vllm_cluster_ifname = None               # interface for NCCL and Gloo between nodes (NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME)
vllm_cluster_layout = "auto"             # pp (TP in a node, PP across) | dp-ep (MoE) | auto = the planner's choice
