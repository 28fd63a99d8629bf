"""`pyflannel`: our own commands (the daemon itself is `flanneld`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def _install_cni(args: argparse.Namespace) -> int:
    from pyflannel.cni.install import install_plugin, install_plugin_with_runtime

    host_dir = Path(args.host_dir) if args.host_dir else None
    if args.python:
        path = install_plugin(Path(args.dest), python=args.python, host_dir=host_dir)
        print(f"installed {path} (runs under {args.python})")
        return 0
    path = install_plugin_with_runtime(Path(args.dest), Path(args.runtime), host_dir)
    print(f"installed {path} with its own runtime (needs no Python on the host)")
    return 0


def _install_conf(args: argparse.Namespace) -> int:
    from pyflannel.cni.install import install_conf

    install_conf(Path(args.src), Path(args.dst))
    print(f"installed {args.dst}")
    return 0


def _cleanup_nexthops(args: argparse.Namespace) -> int:
    from pyflannel.nexthop_cleanup import main as cleanup_main

    return cleanup_main(convert=not args.unused_only, dry_run=args.dry_run)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyflannel", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    # The lab lives in its own package (pyflannel_lab), which the image does not contain.
    sub.add_parser("lab", add_help=False,
                   help="a flannel cluster in network namespaces on this machine (pyflannel_lab)")
    sub.add_parser("status", help="leases in the store, and whether this node's kernel matches "
                   "them (--check); takes flanneld's flags; --help for more")
    inst = sub.add_parser("install-cni", help="install the flannel CNI plugin executable")
    inst.add_argument("--dest", default="/opt/cni/bin", help="directory (default /opt/cni/bin)")
    inst.add_argument("--host-dir", help="where the host sees --dest, if not at the same path")
    inst.add_argument("--runtime", default="/usr/lib/pyflannel/cni-runtime",
                      help="the self-contained runtime to copy (the image has it here)")
    inst.add_argument("--python", help="instead of a runtime, run the plugin under this "
                      "interpreter of the host (an absolute path)")
    inst.set_defaults(func=_install_cni)
    conf = sub.add_parser("install-conf", help="copy a CNI config atomically (temp + rename)")
    conf.add_argument("src")
    conf.add_argument("dst")
    conf.set_defaults(func=_install_conf)
    clean = sub.add_parser(
        "cleanup-nexthops",
        help="after going back to upstream flannel: put every route that still uses one of "
        "pyflannel's nexthop objects in upstream's plain form (in place, no gap), then "
        "remove those nexthop objects; run on the node, with pyflannel stopped",
        description="Routes on pyflannel's nexthop objects (ids 253362176-254410751) are "
        "replaced in place by upstream's form `<subnet> via <gateway> dev <device> "
        "[onlink]` (an atomic replace: the route is never missing), then the nexthop "
        "objects no route uses are removed. Exit status: 0 none of ours left, 1 some kept "
        "or an operation failed, 2 the kernel could not be read.")
    clean.add_argument("--dry-run", action="store_true",
                       help="print what would be done, change nothing")
    clean.add_argument("--unused-only", action="store_true",
                       help="change no route: remove only the nexthop objects no route uses")
    clean.set_defaults(func=_cleanup_nexthops)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["status"]:
        # flanneld's Go-style flags pass through untouched, so argparse stays out of it.
        from pyflannel.status.command import main as status_main

        return status_main(argv[1:])
    if argv[:1] == ["lab"]:
        try:
            from pyflannel_lab.cli import main as lab_main
        except ImportError:
            print("pyflannel lab: the lab package (pyflannel_lab) is not installed here; it "
                  "comes with a source checkout (scripts/setup.sh)", file=sys.stderr)
            return 1
        return lab_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        rc: int = args.func(args)
    except ValueError as e:
        print(f"pyflannel: {e}", file=sys.stderr)
        return 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
