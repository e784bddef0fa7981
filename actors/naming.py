"""Named actors: where each runs, and when its name is free again for a replacement.

Every actor a run starts has a fixed name in namespace ``reft`` (``rollout-N``, ``reward-0``,
``learner-N``): the dashboard and ``ray.get_actor`` find them, and a replacement takes its
predecessor's name. Ray frees a name some time after the actor died: after ``ray.kill``, after
its process or node was lost, or after its driver died (the job's actors go with it), which is
what a ``reft train --resume`` right after a crashed run meets. Starting an actor under a name
still held fails at once ("name already taken"), so whoever starts one waits here first.
"""
from __future__ import annotations

import os
import time


def where() -> dict:
    """This process's place in the Ray cluster: node id, node IP, process id (every actor reports
    it, so that an error about the actor can name the node it was lost on)."""
    import ray
    if not ray.is_initialized():
        return {"node_id": "", "ip": "127.0.0.1", "pid": os.getpid()}
    return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(),
            "pid": os.getpid()}


def describe_node(node) -> str:
    """"node 1a2b3c4d5e6f (10.0.0.5)" for a ``where()`` report; "an unknown node" without one."""
    if not node:
        return "an unknown node"
    return f"node {node['node_id'][:12]} ({node['ip']})"


def name_taken(name: str, namespace: str) -> bool:
    import ray
    try:
        ray.get_actor(name, namespace=namespace)
    except ValueError:
        return False
    return True


def wait_name_free(name: str, namespace: str, timeout_s: float) -> None:
    """Return once no live actor holds ``namespace/name``; TimeoutError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while name_taken(name, namespace):
        if time.monotonic() > deadline:
            raise TimeoutError(f"actor {namespace}/{name} is still registered after {timeout_s:.0f} s: another run "
                               f"(or a process of a stopped one) holds the name; stop it (`ray list actors`), or "
                               f"wait and retry")
        time.sleep(0.1)
