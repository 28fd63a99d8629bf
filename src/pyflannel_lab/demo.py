"""`pyflannel lab demo`: the README's first command. Builds a cluster in network
namespaces with a real store, shows what flannel programmed and that pods reach each
other, and removes it all."""

from __future__ import annotations

import secrets
import sys

from pyflannel_lab import views


def _say(msg: str) -> None:
    print(msg, flush=True)


def run_demo(*, nodes: int = 3, keep: bool = False, backend: str = "host-gw",
             store: str = "etcd") -> int:
    cl = views.build(f"pfl{secrets.token_hex(2)}", {"nodes": nodes, "backend": backend,
                                                    "store": store}, _say)
    try:
        rc = views.show(cl, _say, hint=False)
        if keep:
            _say("\nThe cluster stays up until you press Enter.")
            sys.stdin.readline()
        _say("\nRemoving the cluster (namespaces, daemons, servers)...")
    finally:
        cl.close()
    _say("Done: nothing is left on this machine.")
    return rc
