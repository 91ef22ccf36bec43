"""scripts/jrouter-bench, run small: its JSON parses, every message arrives.

The benchmark starts its own routers, so the test parametrizes the router
name itself; the jabberd2 case proves the test (and the load generator)
against the C router.  No test asserts a time.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCH = REPO_ROOT / "scripts" / "jrouter-bench"
COMPONENTS, MESSAGES = 2, 25

RUN_FIELDS = {
    "router", "protocol", "round", "components", "messages", "size", "window",
    "sent", "delivered", "bounced", "lost", "unsent", "elapsed_s", "stanzas_per_s",
    "latency_ms", "router_cpu_s", "router_cpu_pct", "router_peak_rss_kb",
    "cpu_us_per_stanza", "loadgen_cpu_s", "loadgen_cpu_pct",
}


def bench(*args, timeout=240):
    argv = [sys.executable, str(BENCH), "--python", sys.executable, "--rounds", "1",
            "--messages", str(MESSAGES), "--components", str(COMPONENTS),
            "--time-limit", "30", "--json", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          cwd=REPO_ROOT, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("router", ["jrouter", "jabberd2"])
def test_bench_delivers_every_message_and_reports_every_figure(router):
    """A tiny benchmark run over both protocols delivers all messages and reports all figures."""
    result = bench("--routers", router, "--protocol", "both")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["unavailable"] == {} and doc["all_delivered"] is True
    assert sorted(r["protocol"] for r in doc["runs"]) == ["jabberd2", "xep0114"]
    for run in doc["runs"]:
        assert "error" not in run, run["error"]
        assert RUN_FIELDS <= run.keys(), RUN_FIELDS - run.keys()
        assert run["router"] == router
        assert run["sent"] == run["delivered"] == COMPONENTS * MESSAGES
        assert run["lost"] == run["bounced"] == run["unsent"] == 0
        assert {"p50", "p99", "max"} <= run["latency_ms"].keys()
        assert run["stanzas_per_s"] > 0 and run["router_peak_rss_kb"] > 0
    assert {(s["protocol"], s["router"]) for s in doc["summary"]} == {
        ("jabberd2", router), ("xep0114", router)}


def test_bench_says_when_jrouter_cannot_run_and_measures_the_c_router_alone(tmp_path):
    """If `python -m jrouter` cannot start, the bench says so and still runs jabberd2."""
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho 'no jrouter here' >&2\nexit 3\n")
    broken.chmod(0o755)
    argv = [sys.executable, str(BENCH), "--routers", "jabberd2,jrouter", "--python",
            str(broken), "--rounds", "1", "--messages", "5", "--components", "2",
            "--protocol", "xep0114", "--time-limit", "30", "--json"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=240,
                            cwd=REPO_ROOT, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert "jrouter is not runnable; running jabberd2 alone" in result.stderr
    doc = json.loads(result.stdout)
    assert "no jrouter here" in doc["unavailable"]["jrouter"]
    assert [r["router"] for r in doc["runs"]] == ["jabberd2"]
    assert doc["runs"][0]["delivered"] == 2 * 5


def test_bench_runs_jrouter_trees_in_the_alternation_and_compares_them():
    """--jrouter-tree: each tree is a router of its own, in turn, each round
    starting one later (C, a, b, then a, b, C), imports jrouter from its own
    directory, and gets a/C, b/C and b/a ratios."""
    tree = str(REPO_ROOT)
    result = bench("--protocol", "jabberd2", "--rounds", "2",
                   "--jrouter-tree", f"a={tree}", "--jrouter-tree", f"b={tree}")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["unavailable"] == {} and doc["all_delivered"] is True
    assert [(r["round"], r["router"]) for r in doc["runs"]] == [
        (1, "jabberd2"), (1, "a"), (1, "b"), (2, "a"), (2, "b"), (2, "jabberd2")]
    for name in ("a", "b"):
        assert doc["trees"][name]["dir"] == tree
        assert Path(doc["trees"][name]["module"]).resolve().is_relative_to(REPO_ROOT.resolve())
    assert [(p["a"], p["b"]) for p in doc["pair_ratios"]] == [
        ("a", "jabberd2"), ("b", "jabberd2"), ("b", "a")]
    for pair in doc["pair_ratios"]:
        (tput,) = [r for r in pair["rows"] if r["metric"] == "stanzas/s"]
        assert tput["rounds"] == 2 and 0 < tput["min"] <= tput["median"] <= tput["max"]
    assert "b/a" in result.stderr and "imports " + tree in result.stderr


@pytest.mark.parametrize("spec", ["no-equals-sign", "jrouter=.", "x=/nonexistent"])
def test_bench_refuses_a_bad_jrouter_tree(spec):
    """A --jrouter-tree without NAME=DIR, with a taken name or without jrouter/ is bad usage."""
    result = bench("--jrouter-tree", spec, timeout=60)
    assert result.returncode == 2 and "--jrouter-tree" in result.stderr


def test_bench_says_when_a_jrouter_tree_cannot_run_and_measures_the_others(tmp_path):
    """A tree whose `python -m jrouter` fails is left out, loudly; the rest still run."""
    (tmp_path / "jrouter").mkdir()
    (tmp_path / "jrouter" / "__init__.py").write_text("")
    (tmp_path / "jrouter" / "__main__.py").write_text("raise SystemExit('broken tree')\n")
    result = bench("--protocol", "xep0114", "--jrouter-tree", f"bad={tmp_path}",
                   "--jrouter-tree", f"good={REPO_ROOT}")
    assert result.returncode == 0, result.stderr
    assert "bad is not runnable; running jabberd2, good" in result.stderr
    doc = json.loads(result.stdout)
    assert "broken tree" in doc["unavailable"]["bad"]
    assert [r["router"] for r in doc["runs"]] == ["jabberd2", "good"]
    assert [(p["a"], p["b"]) for p in doc["pair_ratios"]] == [("good", "jabberd2")]


def test_bench_nodes_measures_each_node_count_beside_the_c_router():
    """--nodes 1,2: per protocol a run of jabberd2, 1 node and 2 nodes that delivers
    everything; with 2 nodes every packet crosses the link (component i on node i % 2),
    and the overview has a figure for each k."""
    result = bench("--nodes", "1,2", "--routers", "jabberd2", "--protocol", "both")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["all_delivered"] is True and "nodes" not in doc["unavailable"]
    assert [(r["protocol"], r["router"]) for r in doc["runs"]] == [
        (p, n) for p in ("jabberd2", "xep0114") for n in ("jabberd2", "1 node", "2 nodes")]
    for run in doc["runs"]:
        assert "error" not in run, run["error"]
        assert run["delivered"] == COMPONENTS * MESSAGES and run["lost"] == 0
    for run in (r for r in doc["runs"] if r["router"] != "jabberd2"):
        assert len(run["node_cpu_s"]) == run["nodes"]
        assert run["crossed_fraction"] == run["crossing_expected"] == (run["nodes"] - 1)
    rows = {(r["protocol"], r["router"]): r for r in doc["nodes_overview"]}
    assert set(rows) == {(p, n) for p in ("jabberd2", "xep0114")
                         for n in ("jabberd2", "1 node", "2 nodes")}
    for (proto, name), row in rows.items():
        assert row["stanzas_per_s"] > 0 and len(row["x_1_node"]) == 1
    assert "cpus: " in result.stderr and "2 nodes" in result.stderr


def test_bench_nodes_local_traffic_keeps_every_route_on_its_node():
    """--traffic local: component i sends to i+k, on its own node, so with 2
    nodes nothing crosses a link (the nodes' forwarded_in counters say 0) and
    everything is delivered."""
    result = bench("--nodes", "2", "--routers", "jrouter", "--protocol", "xep0114",
                   "--traffic", "local", "--components", "4")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    runs = {r["router"]: r for r in doc["runs"]}
    assert set(runs) == {"jrouter", "2 nodes"}
    two = runs["2 nodes"]
    assert "error" not in two, two["error"]
    assert two["step"] == 2 and two["delivered"] == 4 * MESSAGES and two["lost"] == 0
    assert two["crossed"] == 0 and two["crossed_fraction"] == two["crossing_expected"] == 0
    assert "i -> i+k" in result.stderr


@pytest.mark.parametrize("args, message", [
    (("--traffic", "local"), "--traffic goes with --nodes"),
    (("--nodes", "2,3", "--traffic", "local"), "a multiple of every node count"),
])
def test_bench_refuses_local_traffic_it_cannot_keep_local(args, message):
    result = bench(*args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
