"""A real etcd server for tests and the lab: temp data dir, ports picked at run time,
loopback or an address inside one of our namespaces, optionally TLS with client certs.

Ports are never fixed (the machine is shared): a free one is found by binding port 0,
and if someone takes it before etcd binds, the start is retried with new ports.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from pyflannel_lab.netns import NetNamespace, OwnedProcess, run

ETCD_BIN = "/usr/bin/etcd"
ETCDCTL_BIN = "/usr/bin/etcdctl"


class EtcdServerError(RuntimeError):
    pass


@dataclass(frozen=True)
class EtcdTLSFiles:
    """A CA and the server and client certificates it signed (PEM files)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls_files(directory: Path,
                   server_ip: str | Sequence[str] = "127.0.0.1") -> EtcdTLSFiles:
    """Generate a CA, a server cert valid for `server_ip` (one address, or several: the
    members of a cluster share it, also as their peer cert) and a client cert with the
    `openssl` CLI. Small EC keys keep this quick."""
    ips = [server_ip] if isinstance(server_ip, str) else list(server_ip)
    san = ",".join(f"IP:{ip}" for ip in ips)
    directory.mkdir(parents=True, exist_ok=True)

    def ossl(*args: str) -> None:
        run(["openssl", *args])

    ca_key, ca = directory / "ca.key", directory / "ca.pem"
    ossl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(ca_key))
    ossl("req", "-x509", "-new", "-key", str(ca_key), "-out", str(ca), "-days", "2",
         "-subj", "/CN=pyflannel-test-ca")

    def leaf(name: str, cn: str, ext: str) -> tuple[Path, Path]:
        key, csr, crt = (directory / f"{name}.key", directory / f"{name}.csr",
                         directory / f"{name}.pem")
        extfile = directory / f"{name}.ext"
        extfile.write_text(ext)
        ossl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key))
        ossl("req", "-new", "-key", str(key), "-out", str(csr), "-subj", f"/CN={cn}")
        ossl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
             "-CAcreateserial", "-out", str(crt), "-days", "2", "-extfile", str(extfile))
        return crt, key

    # clientAuth too: etcd's JSON gateway dials its own gRPC port presenting the server
    # cert, which --client-cert-auth rejects otherwise (503 on every /v3 call).
    server_cert, server_key = leaf(
        "server", "etcd-server",
        f"subjectAltName={san}\nextendedKeyUsage=serverAuth,clientAuth\n")
    client_cert, client_key = leaf(
        "client", "flanneld", "extendedKeyUsage=clientAuth\n")
    return EtcdTLSFiles(ca, server_cert, server_key, client_cert, client_key)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EtcdServer(OwnedProcess):
    """One single-member etcd. Use as a context manager, or start()/stop()."""

    def __init__(self, *, host: str = "127.0.0.1", netns: NetNamespace | None = None,
                 tls: EtcdTLSFiles | None = None, name: str = "pyflannel",
                 ports: tuple[int, int] | None = None, initial_cluster: str = "",
                 base: Path | None = None) -> None:
        """`ports` (client, peer): fixed instead of picked, for members of a cluster whose
        peers must know them in advance; `initial_cluster`: etcd's `name=peer-url,...` of
        all members (default: this one alone). With `tls` the peers use it too."""
        if host in ("0.0.0.0", "::", ""):
            raise ValueError("etcd for tests must listen on a specific address, not all")
        self.host = host
        self.netns = netns
        self.tls = tls
        self.name = name
        # Under `base` (a lab's work directory) when given, so removing that directory after
        # a crash also removes etcd's data.
        self._tmp = Path(tempfile.mkdtemp(prefix="pyflannel-etcd-", dir=base))
        self.data_dir = self._tmp / "data"
        self.log_path = self._tmp / "etcd.log"
        self.fixed_ports = ports
        self.initial_cluster = initial_cluster
        self.client_port, self.peer_port = ports or (0, 0)
        self._proc: subprocess.Popen[bytes] | None = None

    # -- addresses -------------------------------------------------------------------
    @property
    def client_url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.peer_port}"

    def _pick_ports(self) -> tuple[int, int]:
        if self.fixed_ports is not None:
            return self.fixed_ports
        if self.netns is None:
            return _free_port(self.host), _free_port(self.host)
        # A namespace we created has no other listeners: any port is free in it.
        return (int.from_bytes(os.urandom(2), "big") % 20000 + 20000,
                int.from_bytes(os.urandom(2), "big") % 20000 + 40001)

    # -- lifecycle -------------------------------------------------------------------
    def _argv(self) -> list[str]:
        argv = [
            ETCD_BIN, "--name", self.name, "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", self.initial_cluster or f"{self.name}={self.peer_url}",
            "--initial-cluster-state", "new",
            "--logger", "zap", "--log-outputs", "stderr",
        ]
        if self.tls:
            argv += ["--cert-file", str(self.tls.server_cert),
                     "--key-file", str(self.tls.server_key),
                     "--trusted-ca-file", str(self.tls.ca), "--client-cert-auth"]
            argv += ["--peer-cert-file", str(self.tls.server_cert),
                     "--peer-key-file", str(self.tls.server_key),
                     "--peer-trusted-ca-file", str(self.tls.ca), "--peer-client-cert-auth"]
        return self.netns.exec_args(*argv) if self.netns else argv

    def spawn(self) -> None:
        """Start the process on the ports chosen already, without waiting (a cluster's
        members are ready only once a quorum of them runs)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(self._argv(), stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=env)

    def start(self, timeout: float = 30.0) -> None:
        """Start on fresh ports (retrying on a port collision) and wait until ready."""
        if not Path(ETCD_BIN).exists():
            raise EtcdServerError(f"{ETCD_BIN} not found: apt-get install etcd-server")
        last = ""
        for _ in range(5):
            self.client_port, self.peer_port = self._pick_ports()
            # A failed first start may leave a half-initialised member dir behind.
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.spawn()
            try:
                self.wait_ready(timeout)
                return
            except EtcdServerError as e:
                last = str(e)
                self.stop()
                if "address already in use" not in self.log_text():
                    break
        raise EtcdServerError(f"etcd did not start: {last}; log {self.log_path}:\n"
                              f"{self.log_text()[-2000:]}")

    def restart(self, downtime: float = 0.0, timeout: float = 30.0) -> None:
        """Stop, stay down for `downtime` seconds, then start again with the same data
        dir and ports."""
        self.stop()
        time.sleep(downtime)
        self.start_again(timeout)

    def start_again(self, timeout: float = 30.0) -> None:
        """Start a stopped server with its data dir and ports (see restart())."""
        if self.running:
            return
        self.spawn()
        self.wait_ready(timeout)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> EtcdServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- readiness -------------------------------------------------------------------
    def _health_ok(self) -> bool:
        if self.netns is not None:
            return self.etcdctl("endpoint", "health", check=False, timeout=10).returncode == 0
        ctx: ssl.SSLContext | None = None
        if self.tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.load_verify_locations(str(self.tls.ca))
            ctx.load_cert_chain(str(self.tls.client_cert), str(self.tls.client_key))
        # No proxies: the environment may name one, and this is loopback traffic.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                             urllib.request.HTTPSHandler(context=ctx))
        try:
            with opener.open(f"{self.client_url}/health", timeout=2) as resp:
                return b'"true"' in resp.read()
        except OSError:
            return False

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise EtcdServerError("etcd exited during start-up")
            if self._health_ok():
                return
            time.sleep(0.1)
        raise EtcdServerError(f"etcd not healthy at {self.client_url} after {timeout:.0f}s")

    # -- etcdctl ---------------------------------------------------------------------
    def etcdctl(self, *args: str, check: bool = True, input: str | None = None,
                timeout: float = 30, user: str = "") -> subprocess.CompletedProcess[str]:
        """Run Debian's etcdctl (API v3) against this server, in its namespace if any."""
        argv = [ETCDCTL_BIN, f"--endpoints={self.client_url}", "--command-timeout=10s"]
        if self.tls:
            argv += [f"--cacert={self.tls.ca}", f"--cert={self.tls.client_cert}",
                     f"--key={self.tls.client_key}"]
        if user:
            argv.append(f"--user={user}")
        argv += list(args)
        if self.netns:
            argv = self.netns.exec_args("env", "ETCDCTL_API=3", *argv)
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL")}
        env["ETCDCTL_API"] = "3"
        proc = subprocess.run(argv, input=input, capture_output=True, text=True,
                              timeout=timeout, env=env)
        if check and proc.returncode != 0:
            raise EtcdServerError(f"etcdctl {' '.join(args)} failed ({proc.returncode}): "
                                  f"{proc.stderr.strip()}")
        return proc
