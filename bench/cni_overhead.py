"""What the Python flannel CNI plugin costs per pod, against calling `bridge` directly.

Measures, inside a throw-away node namespace with one pod namespace:
- ADD+DEL through our plugin (which delegates to the real bridge + host-local), and
  ADD+DEL of the real bridge given the very config our plugin renders, interleaved;
- the same through the plugin installed with its own runtime (what the image's
  `pyflannel install-cni` writes: the embedded-CPython launcher, loader and libraries), made here
  from this machine's Debian python3.11 when it and patchelf are present;
- CHECK of the attached pod through our plugin (saved config compared with the one built
  now, then the delegate's CHECK), against bridge's CHECK given what our plugin hands it;
- the same through `compiled_flannel/main.go`, a Go meta-plugin doing the flannel plugin's
  steps (built here when a Go toolchain is found, e.g. Debian's golang-1.19-go): what "a
  compiled plugin costs", since no upstream flannel binary is on the machine;
- start-up alone: the installed plugin answering VERSION, against the Go `bridge`
  answering VERSION and a bare `python -I -S -c pass`.
Prints medians, the overhead per call in ms and as a ratio to bridge alone and to the
compiled meta-plugin. Needs root. `--python` is the
host interpreter the plain install runs under (this machine's Debian python3 is what a
host would have; the default is the one running the bench).

    sudo .venv/bin/python bench/cni_overhead.py [-n 40] [--python /usr/bin/python3]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TypeVar

from pyflannel.cni.flannel_plugin import with_route_gateways
from pyflannel.cni.install import PLUGIN_SOURCE, install_plugin, install_plugin_with_runtime
from pyflannel_lab.image.pylayer import build_cni_runtime, host_plugin_modules
from pyflannel_lab.netns import NetNamespace

CNI_BIN = Path("/usr/lib/cni")
COMPILED = "compiled (Go)"
GO_SOURCE = Path(__file__).with_name("compiled_flannel") / "main.go"
T = TypeVar("T")
SUBNET_ENV = ("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\n"
              "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n")


class Samples:
    """Per-sample wall time and CPU time (user + system of the plugin and everything it
    waited for: bridge, host-local). Wall time is what kubelet waits; CPU time barely
    moves with the machine's load, so it shows the same difference on a busy machine."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def add(self, *runs: tuple[float, float]) -> None:
        self.wall.append(sum(run[0] for run in runs))
        self.cpu.append(sum(run[1] for run in runs))


def timed(argv: list[str], stdin: bytes, env: dict[str, str]) -> tuple[float, float]:
    """(wall, CPU) seconds of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(argv, input=stdin, env=env, capture_output=True)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} {env.get('CNI_COMMAND')} failed: {proc.stdout!r} "
                           f"{proc.stderr[-400:]!r}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return elapsed, cpu


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
    add, delete, check = ({**env, "CNI_COMMAND": c} for c in ("ADD", "DEL", "CHECK"))

    # One warm-up ADD gives us the exact delegate config to hand to bridge directly.
    timed([flannel], flannel_stdin, add)
    bridge_stdin = (tmp / "flannel" / "bench").read_bytes()
    timed([flannel], flannel_stdin, delete)
    bridge = str(CNI_BIN / "bridge")
    bundled = tmp / "rbin" / "flannel"
    compiled = tmp / "gobin" / "flannel"
    plugins = {"flannel plugin": flannel, **({"bundled runtime": str(bundled)}
                                             if bundled.exists() else {})}
    reference = {COMPILED: str(compiled)} if compiled.exists() else {}

    # Interleaved, so drift in machine load hits all alike, and in a new random order
    # each round, so that no figure always runs right after another.
    direct = {"bridge direct": bridge}
    stdins = {name: (bridge_stdin if name in direct else flannel_stdin)
              for name in (*direct, *reference, *plugins)}
    add_del = {name: Samples() for name in stdins}
    for _ in range(args.n):
        for name, path in shuffled({**direct, **reference, **plugins}):
            add_del[name].add(timed([path], stdins[name], add),
                              timed([path], stdins[name], delete))

    # CHECK of an attached pod: ours is given the ADD result as prevResult (as the
    # runtime does), bridge directly what our plugin hands it.
    add_result = json.loads(subprocess.run([flannel], input=flannel_stdin, capture_output=True,
                                           env=add, check=True).stdout)
    check_stdin = json.dumps({**conf, "prevResult": add_result}).encode()
    bridge_check = json.dumps({**json.loads(bridge_stdin),
                               "prevResult": with_route_gateways(add_result)}).encode()
    # The Go model passes prevResult through; ours completes the gateways itself.
    compiled_check = json.dumps({**conf, "prevResult": with_route_gateways(add_result)}).encode()
    check_stdins = {**{name: bridge_check for name in direct},
                    **{name: compiled_check for name in reference},
                    **{name: check_stdin for name in plugins}}
    checks = {name: Samples() for name in stdins}
    for _ in range(args.n):
        for name, path in shuffled({**direct, **reference, **plugins}):
            checks[name].add(timed([path], check_stdins[name], check))
    timed([flannel], flannel_stdin, delete)

    version = b'{"cniVersion":"1.0.0"}'
    venv = {"PATH": os.environ["PATH"], "CNI_COMMAND": "VERSION"}
    startup = {f"{name} VERSION": Samples() for name in (*plugins, *reference, "bridge")}
    startup["python -I -S -c pass"] = Samples()
    bare = {"python -I -S -c pass": [args.python, "-I", "-S", "-c", "pass"]}
    for _ in range(args.n):
        for name, argv in shuffled({**{f"{n} VERSION": [p]
                                       for n, p in {**plugins, **reference}.items()},
                                    "bridge VERSION": [bridge], **bare}):
            startup[name].add(timed(argv, version, venv))

    def ms(samples: list[float]) -> float:
        return statistics.median(samples) * 1000

    def table(title: str, figures: dict[str, Samples], calls: int) -> None:
        base = figures["bridge direct"]
        model = figures.get(COMPILED)
        print(f"{title}: {'wall':>8} {'overhead':>9} {'per call':>9} {'ratio':>6} "
              f"{'vs Go':>6}   {'CPU':>7} {'overhead':>9} {'per call':>9}")
        for name, ours in figures.items():
            wall, cpu = ms(ours.wall) - ms(base.wall), ms(ours.cpu) - ms(base.cpu)
            versus = f"{ms(ours.wall) / ms(model.wall):5.2f}x" if model else "    -"
            print(f"  {name:16} {ms(ours.wall):6.1f} ms {wall:6.1f} ms {wall / calls:6.1f} ms "
                  f"{ms(ours.wall) / ms(base.wall):5.2f}x {versus}   {ms(ours.cpu):5.1f} ms "
                  f"{cpu:6.1f} ms {cpu / calls:6.1f} ms")

    print(f"python: {args.python}; n = {args.n} per figure; medians; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if not reference:
        print("  (no Go toolchain found: no compiled meta-plugin to compare with)")
    table("ADD+DEL", add_del, 2)
    table("CHECK  ", checks, 1)
    for name, samples in startup.items():
        print(f"start-up: {name:26} {ms(samples.wall):6.1f} ms   CPU {ms(samples.cpu):5.1f} ms")
    plugin_startup = ms(startup["flannel plugin VERSION"].wall)
    interpreter = ms(startup["python -I -S -c pass"].wall)
    print(f"  plugin start-up over bare interpreter {plugin_startup - interpreter:5.1f} ms "
          f"(ratio {plugin_startup / interpreter:.2f}x; the plugin skips the shutdown)")
    # bridge runs (and starts) in both figures: what the plugin adds is one interpreter
    # process per call before it, so that is the floor of the overhead.
    print(f"  floor of the overhead, one interpreter start per call: {interpreter:.1f} ms "
          f"per call, {2 * interpreter:.1f} ms per ADD+DEL")
    # The load moves the floor as much as the overhead; their difference is what the
    # plugin itself adds (its shutdown skipped, it can dip below 0).
    base = ms(add_del["bridge direct"].wall)
    for name in plugins:
        above = ms(add_del[name].wall) - base - 2 * interpreter
        print(f"  {name} ADD+DEL overhead above that floor: {above:5.1f} ms")


def shuffled(figures: dict[str, T]) -> list[tuple[str, T]]:
    items = list(figures.items())
    random.shuffle(items)
    return items


def find_go() -> str | None:
    found = shutil.which("go")
    return found or next(iter(sorted(glob.glob("/usr/lib/go-*/bin/go"), reverse=True)), None)


def build_compiled_model(tmp: Path) -> None:
    """Build the Go meta-plugin into <tmp>/gobin/flannel (static, stripped, as release
    CNI plugins are), with its build cache inside `tmp`; nothing if there is no Go."""
    go = find_go()
    if go is None:
        return
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp), "GOCACHE": str(tmp / "gocache"),
           "GOPATH": str(tmp / "gopath"), "GO111MODULE": "off", "CGO_ENABLED": "0",
           "GOFLAGS": "", "GOTOOLCHAIN": "local"}
    subprocess.run([go, "build", "-ldflags=-s -w", "-o", str(tmp / "gobin" / "flannel"),
                    str(GO_SOURCE)], env=env, check=True, timeout=600)


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
            build_compiled_model(Path(tmp))
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
