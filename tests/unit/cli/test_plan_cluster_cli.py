"""`vllm-fleet plan --nodes N`: a multi-node cluster planned without hosts."""

from __future__ import annotations

import json

import pytest

from vllm_fleet.cli.main import main


def test_two_nodes_of_4x_a800_print_the_layout_kv_length_why_and_every_rank(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    rc = main(["plan", "--model", "minimax-m2", "--gpus", "4xA800-80G", "--nodes", "2", "--head-address", "10.0.0.1"])
    out = capsys.readouterr().out
    flat = " ".join(out.replace(" \\\n", " ").split())  # the commands as one line each would paste
    assert rc == 0
    assert "Cluster: 2 nodes x 4x A800-80G" in out and "layout pp" in out
    assert "KV per GPU: 31,744 bytes/token; max-model-len 196,608" in out
    assert "why: chosen: PP" in out
    assert "rank 0 (head: serves the API):" in out and "rank 1 (headless worker):" in out
    assert "--nnodes 2 --node-rank 0 --master-addr 10.0.0.1 --master-port 29501 rank 1" in flat
    assert "--nnodes 2 --node-rank 1 --master-addr 10.0.0.1 --master-port 29501 --headless" in flat
    assert out.count("command: ") == 2  # each rank's, not the single-host one too


def test_json_carries_the_cluster_and_each_rank(capsys):
    rc = main(["plan", "--model", "minimax-m2", "--gpus", "4xA800-80G", "--nodes", "2", "--cluster-layout", "dp-ep",
               "--json"])
    doc = json.loads(capsys.readouterr().out)
    c = doc["cluster"]
    assert (c["nodes"], c["gpus_per_node"], c["layout"], c["head_address"]) == (2, 4, "dp-ep", "HEAD_ADDRESS")
    assert rc == 0 and [r["headless"] for r in c["ranks"]] == [False, True]
    assert c["ranks"][1]["argv"][-3:] == ["--data-parallel-start-rank", "4", "--headless"]


def test_one_node_is_no_cluster(capsys):
    assert main(["plan", "--model", "minimax-m2", "--gpus", "4xA800-80G", "--nodes", "0"]) == 2
    assert "at least 2 nodes" in capsys.readouterr().err
