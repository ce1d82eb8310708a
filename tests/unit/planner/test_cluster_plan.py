"""The multi-node plan (vllm_fleet/planner/cluster.py): layouts, exact KV per GPU, each rank's argv, mixed nodes refused.

Hand-checked figures: MiniMax-M2 (models/minimax-m2.yaml: 62 layers, 8 KV heads, head_dim 128, bf16 KV) on
2 hosts x 4x A800-80G.
"""

from __future__ import annotations

import pytest

from vllm_fleet.planner import serveargs
from vllm_fleet.planner.cluster import (ClusterError, check_nodes, make_cluster_plan, parse_cluster_spec)
from vllm_fleet.planner.hardware import parse_gpu_spec
from vllm_fleet.planner.kv import pp_layer_counts
from vllm_fleet.planner.plan import PlanOptions, make_plan

A800x4 = parse_gpu_spec("4xA800-80G")
TWO = [("a800-01", A800x4), ("a800-02", A800x4)]


def test_minimax_m2_on_2x4_a800_serves_the_full_context_with_tp4_pp2():
    cp = make_cluster_plan("minimax-m2", TWO, head_address="10.0.0.1")
    plan = cp.plan
    assert cp.layout == "pp" and plan.ok
    assert (plan.layout.tensor_parallel_size, plan.layout.pipeline_parallel_size, plan.layout.data_parallel_size) == (4, 2, 1)
    # KV bytes per token per GPU, vLLM's arithmetic (kv_cache_interface.py FullAttentionSpec, get_pp_indices):
    #   layers on the largest PP stage: 62 // 2 = 31 (pp_layer_counts)
    #   KV heads per rank: 8 // TP4 = 2; head_dim 128; bf16 = 2 bytes; K and V = 2
    #   2 x 31 x 2 x 128 x 2 = 31,744 bytes/token
    assert pp_layer_counts(62, 2) == [31, 31]
    assert plan.kv_cache_bytes_per_token_per_gpu == 2 * 31 * 2 * 128 * 2 == 31_744
    # The full 196,608-token context: 196608 / 16 = 12,288 blocks x 16 tokens x 31,744 B = 6,241,124,352 B = 5.81 GiB per GPU
    assert plan.max_model_len == plan.model_max_len == 196_608
    assert plan.memory_per_gpu.kv_for_max_len == 196_608 * 31_744 == 6_241_124_352
    assert plan.memory_per_gpu.available_for_kv > plan.memory_per_gpu.kv_for_max_len
    # Single host 4x A800 (TP=4, all 62 layers): 2 x 62 x 2 x 128 x 2 = 63,488 B/token, and the context is cut
    # (the seed's vLLM estimated 158,560 on 9.38 GiB; the planner's conservative overhead model predicts less).
    single = make_plan("minimax-m2", A800x4)
    assert single.kv_cache_bytes_per_token_per_gpu == 63_488 == 2 * plan.kv_cache_bytes_per_token_per_gpu
    assert single.max_model_len < 158_560 < plan.max_model_len


def test_for_a_moe_model_auto_weighs_dp_ep_and_says_why_pp_wins_here():
    cp = make_cluster_plan("minimax-m2", TWO)
    text = "\n".join(cp.reasons)
    # DP+EP: TP=1 keeps all 62 layers and all 8 KV heads on every GPU: 2 x 62 x 8 x 128 x 2 = 253,952 B/token.
    assert "253,952 bytes/token" in text and "31,744 bytes/token" in text
    assert "chosen: PP" in text and "196,608" in text


def test_dp_ep_on_request_renders_the_data_parallel_multi_node_flags():
    cp = make_cluster_plan("minimax-m2", TWO, layout="dp-ep", head_address="10.0.0.1", port=13345)
    lay = cp.plan.layout
    assert cp.layout == "dp-ep" and (lay.tensor_parallel_size, lay.data_parallel_size, lay.expert_parallel) == (1, 8, True)
    head, worker = cp.ranks
    assert head.argv[-6:] == ("--data-parallel-size-local", "4", "--data-parallel-address", "10.0.0.1",
                              "--data-parallel-rpc-port", "13345")
    assert worker.argv[-9:] == ("--data-parallel-size-local", "4", "--data-parallel-address", "10.0.0.1",
                               "--data-parallel-rpc-port", "13345", "--data-parallel-start-rank", "4", "--headless")
    assert "--data-parallel-size" in head.argv and "--enable-expert-parallel" in head.argv


def test_dp_ep_is_refused_for_a_dense_model(tmp_path):
    import json
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16", "hidden_size": 1024,
           "intermediate_size": 4096, "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 8,
           "head_dim": 64, "vocab_size": 32000, "max_position_embeddings": 8192}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ClusterError, match="needs a MoE model"):
        make_cluster_plan(str(tmp_path), TWO, layout="dp-ep")
    cp = make_cluster_plan(str(tmp_path), TWO)
    assert cp.layout == "pp" and "dense model" in cp.reasons[-1]


def test_each_rank_gets_its_node_rank_the_head_address_and_only_workers_run_headless():
    cp = make_cluster_plan("minimax-m2", [*TWO, ("a800-03", A800x4), ("a800-04", A800x4)], layout="pp",
                           head_address="10.0.0.1", port=29600, host_ips={"a800-01": "10.0.0.1", "a800-03": "10.0.0.3"},
                           ifname="ens1f0")
    assert cp.plan.layout.pipeline_parallel_size == 4 and [r.host for r in cp.ranks] == ["a800-01", "a800-02", "a800-03", "a800-04"]
    for r in cp.ranks:
        tail = ["--nnodes", "4", "--node-rank", str(r.rank), "--master-addr", "10.0.0.1", "--master-port", "29600"]
        assert list(r.argv[-len(tail) - r.headless:len(r.argv) - r.headless]) == tail
        assert r.headless == ("--headless" in r.argv) == (r.rank > 0)
        assert r.argv[:len(cp.plan.argv)] == tuple(cp.plan.argv)  # every rank: the same engine config
        assert r.env["NCCL_SOCKET_IFNAME"] == r.env["GLOO_SOCKET_IFNAME"] == "ens1f0"
    assert cp.ranks[0].env["VLLM_HOST_IP"] == "10.0.0.1" and cp.ranks[2].env["VLLM_HOST_IP"] == "10.0.0.3"
    assert "VLLM_HOST_IP" not in cp.ranks[1].env


@pytest.mark.parametrize("layout", ["pp", "dp-ep"])
def test_every_rank_flag_is_one_the_pinned_vllm_has(layout):
    """The flags exist in vllm_serve_flags.json (dumped from vLLM 0.25.0's own parser; tests/realvllm checks that
    file against the real parser) and every word of each rank's argv parses there, nothing unknown."""
    cp = make_cluster_plan("minimax-m2", TWO, layout=layout, head_address="10.0.0.1")
    known = set(serveargs.all_flags())
    for r in cp.ranks:
        assert {f.name for f in r.flags} <= known
        parsed = serveargs.parse(r.argv[3:])  # after `vllm serve MODEL`
        assert parsed.unknown == ()
        assert {f.name for f in r.flags} <= {u.flag for u in parsed.uses}


def test_mixed_gpu_kinds_or_counts_are_one_clear_error():
    with pytest.raises(ClusterError) as e:
        check_nodes([("a800-01", A800x4), ("h200-01", parse_gpu_spec("4xH200")), ("a800-02", parse_gpu_spec("2xA800-80G"))])
    text = str(e.value)
    assert "h200-01: 4x H200" in text and "a800-02: 2x A800-80G" in text and "Remedy" in text
    with pytest.raises(ClusterError, match="at least 2 nodes"):
        check_nodes([("a800-01", A800x4)])


def test_a_model_that_does_not_fit_across_the_nodes_is_not_deployable():
    cp = make_cluster_plan("minimax-m2", [("a", parse_gpu_spec("1xA10")), ("b", parse_gpu_spec("1xA10"))], layout="pp")
    assert not cp.ok and "MODEL_TOO_LARGE" in {e.code for e in cp.plan.errors}


def test_cluster_spec():
    n, hw = parse_cluster_spec("2x4xA800-80G")
    assert n == 2 and hw == A800x4
    with pytest.raises(ClusterError, match="NODESxCOUNTxMODEL"):
        parse_cluster_spec("4xA800-80G")

