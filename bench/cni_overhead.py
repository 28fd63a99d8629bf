"""What the Python flannel CNI plugin costs per pod, against calling `bridge` directly.

Measures, inside a throw-away node namespace with one pod namespace:
- ADD+DEL through our plugin (which delegates to the real bridge + host-local), and
  ADD+DEL of the real bridge given the very config our plugin renders, interleaved;
- the same through the plugin installed with its own runtime (what the image's
  `pyflannel install-cni` writes: copied interpreter, loader and libraries), made here
  from this machine's Debian python3.11 when it and patchelf are present;
- start-up alone: `python -I -S plugin` answering VERSION, against the Go `bridge`
  answering VERSION and a bare `python -I -S -c pass`.
Prints medians, the overhead in ms and as a ratio. Needs root.

    sudo .venv/bin/python bench/cni_overhead.py [-n 40]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pyflannel.cni.install import PLUGIN_SOURCE, install_plugin, install_plugin_with_runtime
from pyflannel_lab.image.pylayer import build_cni_runtime, host_plugin_modules
from pyflannel_lab.netns import NetNamespace

CNI_BIN = Path("/usr/lib/cni")
SUBNET_ENV = ("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\n"
              "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n")


def timed(argv: list[str], stdin: bytes, env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, input=stdin, env=env, capture_output=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} {env.get('CNI_COMMAND')} failed: {proc.stdout!r} "
                           f"{proc.stderr[-400:]!r}")
    return elapsed


def inner(args: argparse.Namespace) -> None:
    """Runs inside the node namespace, so no `ip netns exec` cost is in the figures."""
    tmp = Path(args.tmp)
    flannel = str(tmp / "bin" / "flannel")
    conf = {"cniVersion": "1.0.0", "name": "cbr0", "type": "flannel",
            "subnetFile": str(tmp / "subnet.env"), "dataDir": str(tmp / "flannel"),
            "ipam": {"dataDir": str(tmp / "ipam")},
            "delegate": {"hairpinMode": True, "isDefaultGateway": True}}
    env = {"PATH": os.environ["PATH"], "CNI_CONTAINERID": "bench", "CNI_NETNS": args.pod,
           "CNI_IFNAME": "eth0", "CNI_PATH": f"{tmp / 'bin'}:{CNI_BIN}"}
    flannel_stdin = json.dumps(conf).encode()

    # One warm-up ADD gives us the exact delegate config to hand to bridge directly.
    timed([flannel], flannel_stdin, {**env, "CNI_COMMAND": "ADD"})
    bridge_stdin = (tmp / "flannel" / "bench").read_bytes()
    timed([flannel], flannel_stdin, {**env, "CNI_COMMAND": "DEL"})
    bridge = str(CNI_BIN / "bridge")
    bundled = tmp / "rbin" / "flannel"

    via_flannel: list[float] = []
    via_bundled: list[float] = []
    direct: list[float] = []
    for _ in range(args.n):  # interleaved, so drift in machine load hits all alike
        via_flannel.append(timed([flannel], flannel_stdin, {**env, "CNI_COMMAND": "ADD"})
                           + timed([flannel], flannel_stdin, {**env, "CNI_COMMAND": "DEL"}))
        if bundled.exists():
            via_bundled.append(
                timed([str(bundled)], flannel_stdin, {**env, "CNI_COMMAND": "ADD"})
                + timed([str(bundled)], flannel_stdin, {**env, "CNI_COMMAND": "DEL"}))
        direct.append(timed([bridge], bridge_stdin, {**env, "CNI_COMMAND": "ADD"})
                      + timed([bridge], bridge_stdin, {**env, "CNI_COMMAND": "DEL"}))

    version = b'{"cniVersion":"1.0.0"}'
    venv = {"PATH": os.environ["PATH"], "CNI_COMMAND": "VERSION"}
    startup: dict[str, list[float]] = {"plugin VERSION": [], "bridge VERSION": [],
                                       "python -I -S -c pass": []}
    if bundled.exists():
        startup["bundled plugin VERSION"] = []
    for _ in range(args.n):
        startup["plugin VERSION"].append(timed([flannel], version, venv))
        if bundled.exists():
            startup["bundled plugin VERSION"].append(timed([str(bundled)], version, venv))
        startup["bridge VERSION"].append(timed([bridge], version, venv))
        startup["python -I -S -c pass"].append(
            timed([args.python, "-I", "-S", "-c", "pass"], b"", venv))

    def ms(samples: list[float]) -> float:
        return statistics.median(samples) * 1000

    print(f"python: {args.python}; n = {args.n} per figure; medians")
    print(f"ADD+DEL via flannel plugin     {ms(via_flannel):7.1f} ms")
    print(f"ADD+DEL bridge direct          {ms(direct):7.1f} ms")
    print(f"  overhead                     {ms(via_flannel) - ms(direct):7.1f} ms  "
          f"ratio {ms(via_flannel) / ms(direct):.2f}x")
    if via_bundled:
        print(f"ADD+DEL via bundled runtime    {ms(via_bundled):7.1f} ms")
        print(f"  overhead                     {ms(via_bundled) - ms(direct):7.1f} ms  "
              f"ratio {ms(via_bundled) / ms(direct):.2f}x")
    for name, samples in startup.items():
        print(f"start-up: {name:22} {ms(samples):7.1f} ms")
    plugin_startup = ms(startup["plugin VERSION"])
    bare = ms(startup["python -I -S -c pass"])
    print(f"  plugin start-up over bare interpreter {plugin_startup - bare:5.1f} ms "
          f"(ratio {plugin_startup / bare:.2f}x)")


def outer(args: argparse.Namespace) -> None:
    if os.geteuid() != 0:
        sys.exit("needs root: it creates network namespaces")
    node = NetNamespace.create("pfbnode")
    pod = None
    try:
        pod = NetNamespace.create("pfbpod")
        with tempfile.TemporaryDirectory(prefix="cni-bench-") as tmp:
            install_plugin(Path(tmp) / "bin", python=args.python)
            if Path("/usr/bin/python3.11").exists() and shutil.which("patchelf"):
                runtime = Path(tmp) / "cni-runtime"
                build_cni_runtime(Path("/"), runtime, host_plugin_modules(PLUGIN_SOURCE))
                install_plugin_with_runtime(Path(tmp) / "rbin", runtime=runtime)
            (Path(tmp) / "subnet.env").write_text(SUBNET_ENV)
            subprocess.run(node.exec_args(sys.executable, __file__, "--inner", "--pod",
                                          pod.path, "--tmp", tmp, "-n", str(args.n),
                                          "--python", args.python), check=True)
    finally:
        if pod is not None:
            pod.delete()
        node.delete()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("-n", type=int, default=40, help="samples per figure (>= 30)")
    parser.add_argument("--python", default=os.path.realpath(sys.executable),
                        help="interpreter the installed plugin runs under")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pod", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.n < 30:
        parser.error("-n must be at least 30 for a stable median")
    (inner if args.inner else outer)(args)


if __name__ == "__main__":
    main()
