"""`pyflannel`: our own commands (the daemon itself is `flanneld`)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def _lab_demo(args: argparse.Namespace) -> int:
    from pyflannel.lab.demo import run_demo

    return run_demo(nodes=args.nodes, keep=args.keep)


def _install_cni(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pyflannel.cni.install import install_plugin

    path = install_plugin(Path(args.dest))
    print(f"installed {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyflannel", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    lab = sub.add_parser("lab", help="a flannel cluster in network namespaces on this machine")
    labsub = lab.add_subparsers(dest="lab_command", required=True)
    demo = labsub.add_parser("demo", help="build a cluster, show its routes, remove it")
    demo.add_argument("--nodes", type=int, default=3, help="number of nodes (default 3)")
    demo.add_argument("--keep", action="store_true",
                      help="wait for Enter before removing the cluster")
    demo.set_defaults(func=_lab_demo)
    sub.add_parser("status", help="leases in the store, and whether this node's kernel matches "
                   "them (--check); takes flanneld's flags; --help for more")
    inst = sub.add_parser("install-cni", help="install the flannel CNI plugin executable")
    inst.add_argument("--dest", default="/opt/cni/bin", help="directory (default /opt/cni/bin)")
    inst.set_defaults(func=_install_cni)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["status"]:
        # flanneld's Go-style flags pass through untouched, so argparse stays out of it.
        from pyflannel.status.command import main as status_main

        return status_main(argv[1:])
    args = build_parser().parse_args(argv)
    if getattr(args, "command", None) == "lab" and os.geteuid() != 0:
        print("pyflannel lab: needs root (it creates network namespaces); run it with sudo",
              file=sys.stderr)
        return 1
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
