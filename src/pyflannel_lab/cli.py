"""`pyflannel lab ...` (also `pyflannel-lab ...`): the lab's commands. Not part of the
product: the image does not contain this package."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

DEFAULT_LABEL = "lab"


def _lab_demo(args: argparse.Namespace) -> int:
    from pyflannel_lab.demo import run_demo

    return run_demo(nodes=args.nodes, keep=args.keep, backend=args.backend, store=args.store)


def _lab(args: argparse.Namespace) -> int:
    from pyflannel_lab import session

    label = args.label
    cmd = args.lab_command
    if cmd == "up":
        opts: dict[str, object] = {"nodes": args.nodes, "backend": args.backend,
                                   "store": args.store}
        if args.kubernetes:
            opts.update(kubernetes=True, deploy=not args.no_flannel)
        return session.up(label, opts)
    if cmd == "down":
        return session.down(label)
    req: dict[str, object] = {"cmd": {"show": "show"}.get(cmd, cmd)}
    if cmd in ("remove-node", "reboot", "replace-flannel"):
        req["node"] = args.node
    if cmd == "rolling-update":
        req["tag"] = args.tag
    if cmd == "graph":
        req["out"] = str(Path(args.out).resolve())
    return session.request(label, req)


def _lab_status(args: argparse.Namespace) -> int:
    """`pyflannel status --check` run inside every lab node."""
    from pyflannel_lab import session

    return session.request(args.label, {"cmd": "status"})


def _lab_kube(args: argparse.Namespace) -> int:
    """`lab kubectl ...` and `lab exec NODE -- CMD`: run here, not in the supervisor, so
    their output and exit status are the command's own."""
    import subprocess

    from pyflannel_lab import kubelab, session

    st = session.kube_state(args.label)
    if args.lab_command == "kubectl":
        argv = kubelab.kubectl_argv(st, *args.args)
    else:
        cmd = list(args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd)
        if not cmd:
            raise ValueError("exec: a command is expected after the node name")
        argv = kubelab.node_exec_argv(st, args.node, *cmd)
    return subprocess.run(argv).returncode


def _cluster_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, default=3, help="number of nodes (default 3)")
    p.add_argument("--backend", choices=["host-gw", "vxlan", "wireguard"], default="host-gw",
                   help="flannel backend (default host-gw)")
    p.add_argument("--store", choices=["etcd", "etcd-cluster", "etcd-cluster-tls", "kube"],
                   default="etcd",
                   help="where leases live (default etcd, one member; etcd-cluster: three "
                   "members in their own namespaces, -tls with client certificates; kube "
                   "needs the apiserver that scripts/build-kubernetes.sh installs)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyflannel lab",
                                description="a flannel cluster in network namespaces on this "
                                "machine")
    lab = p
    lab.add_argument("--label", default=DEFAULT_LABEL,
                     help="which lab, when several are up (default 'lab')")
    labsub = lab.add_subparsers(dest="lab_command", required=True)
    demo = labsub.add_parser("demo", help="build a cluster, show it, remove it (one command)")
    _cluster_options(demo)
    demo.add_argument("--keep", action="store_true",
                      help="wait for Enter before removing the cluster")
    demo.set_defaults(func=_lab_demo)
    up = labsub.add_parser("up", help="build a cluster that stays up; then add-node, "
                           "remove-node, graph, status, down")
    _cluster_options(up)
    up.add_argument("--kubernetes", action="store_true",
                    help="real Kubernetes: control plane, a containerd + kubelet per node, "
                    "flannel deployed with `kubectl create -f deploy/kube-flannel.yml`")
    up.add_argument("--no-flannel", action="store_true",
                    help="with --kubernetes: stop before `kubectl create` (type the "
                    "walk-through yourself with `lab kubectl` and `lab exec`)")
    up.set_defaults(func=_lab)
    for name, what in (("reboot", "--kubernetes: a node reboots (everything on it stops, its "
                        "routes and devices go); its routes come back by themselves"),
                       ("replace-flannel", "--kubernetes: delete a node's flannel pod; the "
                        "DaemonSet's new one takes over with no peer route removed")):
        ev = labsub.add_parser(name, help=what)
        ev.add_argument("node", help="e.g. node2")
        ev.set_defaults(func=_lab)
    ru = labsub.add_parser("rolling-update", help="--kubernetes: the DaemonSet moves to a new "
                           "image tag while pods keep TCP connections open (counted)")
    ru.add_argument("--tag", default="v0.1.1", help="the new tag (default v0.1.1)")
    ru.set_defaults(func=_lab)
    labsub.add_parser("pods", help="--kubernetes: an ordinary pod on every node; who reaches "
                      "whom, and with which source address").set_defaults(func=_lab)
    kc = labsub.add_parser("kubectl", help="kubectl with the --kubernetes lab's kubeconfig")
    kc.add_argument("args", nargs=argparse.REMAINDER, help="kubectl's arguments")
    kc.set_defaults(func=_lab_kube)
    ex = labsub.add_parser("exec", help="run a command on a --kubernetes lab node "
                           "(its network, mount and UTS namespaces)")
    ex.add_argument("node", help="e.g. node1")
    ex.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    ex.set_defaults(func=_lab_kube)
    labsub.add_parser("show", help="every node's routes and the reachability matrix"
                      ).set_defaults(func=_lab)
    labsub.add_parser("add-node", help="a new node joins; watch routes appear everywhere"
                      ).set_defaults(func=_lab)
    rm = labsub.add_parser("remove-node", help="a node leaves; watch its routes disappear")
    rm.add_argument("node", help="e.g. node2")
    rm.set_defaults(func=_lab)
    gr = labsub.add_parser("graph", help="write an SVG picture of nodes, subnets and routes")
    gr.add_argument("--out", default="flannel-lab.svg", help="file (default flannel-lab.svg)")
    gr.set_defaults(func=_lab)
    labsub.add_parser("status", help="`pyflannel status --check` on every node"
                      ).set_defaults(func=_lab_status)
    labsub.add_parser("down", help="remove the lab, also after a crash").set_defaults(func=_lab)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if os.geteuid() != 0:
        print("pyflannel lab: needs root (it creates network namespaces); run it with sudo",
              file=sys.stderr)
        return 1
    try:
        rc: int = args.func(args)
    except BrokenPipeError:  # `pyflannel lab show | head`: the reader has gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:
        from pyflannel_lab.session import LabError

        if not isinstance(e, LabError | ValueError):
            raise
        print(f"pyflannel lab: {e}", file=sys.stderr)
        return 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
