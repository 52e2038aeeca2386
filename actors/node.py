"""Where this process runs, as Ray sees it (for rendezvous addresses that work across nodes)."""
from __future__ import annotations


def node_ip() -> str:
    """This process's node IP per Ray (127.0.0.1 on a local cluster bound there, or outside Ray)."""
    import ray
    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
