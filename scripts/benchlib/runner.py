"""One benchmark run: a fresh router, the load generator, the result.

Owns: the order of events of a run (config, router start, load generator
process, router stop) and its bounds in time; the check that a router can
run at all.  Knows nothing about tables.

Every run gets a fresh router process, so peak RSS (VmHWM) belongs to that
run alone, and a crash or leak cannot spill into the next measurement.
The router is pinned to one core and the load generator to the other
(2-core machine: the router gets one core, the clients the other).

A run of several nodes (`run_cluster`) starts one etcd and k jrouter nodes
(benchlib.cluster) instead of the router, in a fresh directory too; where
they run is `Settings.cluster_cpus`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from . import cluster, routers

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = os.path.dirname(HERE)
REPO = os.path.dirname(SCRIPTS)


@dataclass(frozen=True)
class Settings:
    python: str  # interpreter for `python -m jrouter`
    time_limit: float  # s of sending per measured phase
    nap_us: float  # load generator poll moderation
    pin: bool  # router on cpu 0, load generator on cpu 1
    grace: float = 10.0  # s to collect what is in flight after time_limit
    stall: float = 10.0  # s without any arrival that end a phase
    trees: Tuple[routers.Tree, ...] = ()  # jrouter source trees run as routers of their own

    def cpus(self):
        """(router cpus, load generator cpus), or (None, None) when not pinning."""
        ncpu = len(os.sched_getaffinity(0))
        if not self.pin or ncpu < 2:
            return None, None
        avail = sorted(os.sched_getaffinity(0))
        return [avail[0]], avail[1:]

    def cluster_cpus(self, k: int) -> Tuple[List[Optional[List[int]]], Optional[List[int]]]:
        """(cpus of each of `k` nodes, load generator cpus); None: not pinned.

        One node is pinned as a single router is (cpus()), so it is measured
        as the references are.  Several nodes and the load generator are not
        pinned: they share every core as the kernel schedules them; pinning
        them would give one node a core of its own and make the other share
        with the load generator (2 cores), or put every node on one core."""
        if k == 1:
            router, gen = self.cpus()
            return [router], gen
        return [None] * k, None

    def cluster_cpu_policy(self, ks: List[int]) -> str:
        """One sentence for the output: where the nodes and the generator run."""
        router, gen = self.cpus()
        if router is None:
            return "nothing pinned: routers, nodes and load generator share every core"
        several = [k for k in ks if k > 1]
        text = (f"jabberd2, jrouter and 1 node on cpu {router[0]}, load generator on cpu "
                f"{','.join(map(str, gen))}")
        if several:
            text += (f"; with {', '.join(map(str, several))} nodes nothing is pinned: the "
                     f"nodes and the load generator share all {len(os.sched_getaffinity(0))} "
                     f"cores as the kernel schedules them")
        return text


def setup_timeout(components: int) -> float:
    """Seconds allowed for connecting and authenticating `components`."""
    return 30.0 + 0.1 * components


def run(router: str, settings: Settings, *, mode: str, protocol: str, components: int,
        messages: int = 0, size: int = 200, window: int = 100) -> Dict[str, Any]:
    """Start `router`, drive it with the load generator, stop it; return the figures.

    The result always has the run's parameters; on failure it has "error"."""
    result: Dict[str, Any] = dict(router=router, mode=mode, protocol=protocol,
                                  components=components, messages=messages, size=size,
                                  window=window)
    router_cpus, gen_cpus = settings.cpus()
    with tempfile.TemporaryDirectory(prefix="jrouter-bench-") as tmp:
        port = routers.free_port()
        config = routers.write_config(tmp, port)
        argv, cwd, env = routers.launch(router, config, settings.python, REPO, settings.trees)
        proc = routers.Router(router, argv, cwd, os.path.join(tmp, "router.log"), port,
                              router_cpus, env)
        try:
            proc.start()
            spec = load_spec(settings, mode=mode, protocol=protocol, components=components,
                             messages=messages, size=size, window=window, ports=[port],
                             router_pids=[proc.pid])
            result.update(loadgen(spec, gen_cpus))
            if not proc.alive():
                result["error"] = (f"{router} died during the run (status "
                                   f"{proc.proc.returncode}):\n{proc.log_tail()}")
            elif "error" in result:
                result["error"] += "\n  router log:\n" + proc.log_tail()
        except routers.RouterError as e:
            result["error"] = str(e)
        finally:
            proc.stop()
    return result


def load_spec(settings: Settings, **run: Any) -> Dict[str, Any]:
    """The load generator's spec: the run's parameters, its bounds, the accounts."""
    return dict(run, time_limit=settings.time_limit, grace=settings.grace,
                stall=settings.stall, nap_us=settings.nap_us,
                setup_timeout=setup_timeout(run["components"]),
                user=routers.USER, password=routers.PASSWORD, secret=routers.SECRET, repo=REPO)


def crossing(components: int, k: int, step: int = 1) -> float:
    """The share of the ring's routes i -> i+step whose ends are on different
    nodes, with component i on node i % k (what the links should carry)."""
    if k < 2:
        return 0.0
    return sum(i % k != ((i + step) % components) % k for i in range(components)) / components


def run_cluster(k: int, settings: Settings, *, protocol: str, components: int,
                messages: int, size: int = 200, window: int = 100,
                step: int = 1) -> Dict[str, Any]:
    """One etcd and `k` jrouter nodes as one router (benchlib.cluster), the
    components spread over them (component i on node i % k), the throughput
    traffic (component i sends to i + `step`); then everything stopped.  The result is run()'s, with the
    figures of each node and of the traffic across nodes; on failure
    "error", with the nodes' logs."""
    result: Dict[str, Any] = dict(router=cluster_label(k), nodes=k, mode="throughput",
                                  protocol=protocol, components=components, messages=messages,
                                  size=size, window=window, step=step,
                                  crossing_expected=crossing(components, k, step))
    node_cpus, gen_cpus = settings.cluster_cpus(k)
    with tempfile.TemporaryDirectory(prefix="jrouter-bench-nodes-") as tmp:
        nodes = cluster.Cluster(k, tmp, settings.python, REPO, node_cpus)
        try:
            nodes.start()
            result["ready_s"] = nodes.ready_s
            spec = load_spec(settings, mode="throughput", protocol=protocol,
                             components=components, messages=messages, size=size,
                             window=window, step=step, ports=nodes.ports,
                             router_pids=nodes.pids,
                             status_ports=nodes.status_ports, etcd_pid=nodes.etcd.pid)
            result.update(loadgen(spec, gen_cpus))
            dead = nodes.dead()
            if dead:
                result["error"] = f"a process died during the run:\n{dead}"
            elif "error" in result or result.get("lost") or result.get("unsent"):
                result["logs"] = nodes.logs(40)
                if "error" in result:
                    result["error"] += "\n" + result["logs"]
        except routers.RouterError as e:  # ClusterError too: etcd, a node, no links
            result["error"] = str(e)
        finally:
            nodes.stop()
    if "crossed" in result and result.get("delivered"):
        result["crossed_fraction"] = result["crossed"] / result["delivered"]
    return result


def cluster_label(k: int) -> str:
    return f"{k} node" + ("s" if k > 1 else "")


def loadgen(spec: Dict[str, Any], cpus: Optional[List[int]]) -> Dict[str, Any]:
    """Run the load generator process with `spec`; its JSON answer, or an error."""
    timeout = spec["setup_timeout"] + spec["time_limit"] + spec["grace"] + 60
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SCRIPTS, REPO]))
    proc = subprocess.Popen([sys.executable, "-m", "benchlib.loadgen", json.dumps(spec)],
                            cwd=SCRIPTS, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=routers.child_setup(cpus))
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"error": f"load generator did not finish within {timeout:.0f} s"}
    finally:
        if proc.poll() is None:  # KeyboardInterrupt and friends
            proc.kill()
            proc.wait()
    try:
        return json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = err.decode("utf-8", "replace").strip().splitlines()[-8:]
        return {"error": f"load generator failed (status {proc.returncode}):\n    "
                         + "\n    ".join(tail)}


def probe(router: str, settings: Settings) -> Optional[str]:
    """None if `router` starts and listens; else why not, in one paragraph.
    A tree must also import jrouter from itself (routers.tree_module)."""
    if router == "jabberd2" and not os.access(routers.C_ROUTER, os.X_OK):
        return f"{routers.C_ROUTER} is not installed (apt-get install jabberd2)"
    for tree in settings.trees:
        if tree.name == router:
            try:
                routers.tree_module(tree, settings.python)
            except routers.RouterError as e:
                return str(e)
    with tempfile.TemporaryDirectory(prefix="jrouter-bench-") as tmp:
        port = routers.free_port()
        config = routers.write_config(tmp, port)
        argv, cwd, env = routers.launch(router, config, settings.python, REPO, settings.trees)
        proc = routers.Router(router, argv, cwd, os.path.join(tmp, "router.log"), port, env=env)
        try:
            proc.start()
        except (routers.RouterError, OSError) as e:
            shown = " ".join(os.path.basename(a) if a == settings.python else a for a in argv[:3])
            return f"`{shown} -c router.xml` failed: {e}"
        finally:
            proc.stop()
    return None
