"""The Python layer of the image: pyflannel, its locked dependencies, the .pyc files
flanneld imports, and the self-contained runtime of the CNI plugin.

- Dependencies come from deploy/requirements.lock (exact versions, sha256 of each wheel)
  and go in with `pip --require-hashes --no-deps`: a changed wheel or an unlisted
  dependency fails the build. Wheels are downloaded once per machine into the cache.
- pyflannel is the git-tracked files of src/pyflannel, nothing else: no lab, tests or
  benchmarks.
- .pyc files: Debian's are hash-seed dependent, so none are kept; after importing every
  pyflannel module inside the image (chroot over an overlay of the rootfs), each loaded
  module is compiled with PYTHONHASHSEED=0 as an unchecked-hash .pyc (no mtime inside).
- The CNI runtime (/usr/lib/pyflannel/cni-runtime): the plugin's launcher
  (src/pyflannel/cni/launcher.c: CPython embedded from Debian's libpython3.11.a, started
  only to its core), linked with a long placeholder ELF interpreter path and RPATH
  $ORIGIN/../lib, and symlinks to the loader, libraries and stdlib modules the plugin
  imports. `pyflannel install-cni` copies it to the host with the links resolved and
  writes the real loader path into the copy.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pyflannel.cni.install import (
    LAUNCHER,
    RUNTIME_INTERP_PLACEHOLDER,
    RUNTIME_MANIFEST,
    read_elf_interpreter,
)
from pyflannel_lab.image.oci import sha256_file
from pyflannel_lab.image.rootfs import CACHE_ROOT

PY = "python3.11"
SITE = "usr/lib/python3/dist-packages"
RUNTIME_DIR = "usr/lib/pyflannel/cni-runtime"
LAUNCHER_SOURCE = Path(__file__).parents[2] / "pyflannel" / "cni" / "launcher.c"
# Debian's static libpython, from libpython3.11-dev of exactly the version of the
# python3.11 whose bytecode and `_json` the launcher runs.
LIBPYTHON = f"usr/lib/{PY}/config-3.11-x86_64-linux-gnu/lib{PY}.a"
LIBPYTHON_PACKAGE = f"lib{PY}-dev"
WHEEL_PLATFORMS = ("manylinux_2_36_x86_64", "manylinux_2_28_x86_64", "manylinux_2_17_x86_64",
                   "manylinux2014_x86_64", "manylinux1_x86_64", "any")
PYPI = "https://pypi.org/simple"


class PythonLayerError(RuntimeError):
    """The Python layer could not be built."""


@dataclass(frozen=True)
class LockedWheel:
    name: str
    version: str
    sha256: str


def read_lock(path: Path) -> list[LockedWheel]:
    """Parse a pip requirements file of `name==version --hash=sha256:...` entries."""
    text = path.read_text().replace("\\\n", " ")
    wheels: list[LockedWheel] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#")[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)\s+--hash=sha256:([0-9a-f]{64})", line)
        if not match:
            raise PythonLayerError(f"{path}:{number}: expected 'name==version "
                                   f"--hash=sha256:<64 hex>', got {line!r}")
        wheels.append(LockedWheel(*match.groups()))
    return wheels


def _pip_target_options() -> list[str]:
    options = ["--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
               "--abi", "cp311"]
    for platform in WHEEL_PLATFORMS:
        options += ["--platform", platform]
    return options


def _pip(python: str, *args: str) -> None:
    # PIP_CONFIG_FILE=/dev/null: this machine's pip config adds local indexes whose
    # wheels may differ from PyPI's; the lock's hashes are PyPI's.
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    for name in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_INDEX_URL", "PIP_CONSTRAINT"):
        env.pop(name, None)
    cert = Path("/etc/ssl/certs/ca-certificates.crt")
    extra = ["--cert", str(cert)] if cert.is_file() else []
    proc = subprocess.run([python, "-m", "pip", *args, *extra], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise PythonLayerError(f"pip {args[0]} failed: {proc.stderr.strip()[-2000:]}")


def fetch_wheels(lock: Path, wheel_dir: Path, python: str) -> None:
    """Download the locked wheels into `wheel_dir`, unless a wheel with each locked hash is
    there already (then the build needs no network; pip checks the hashes again on
    install)."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    have = {sha256_file(p) for p in wheel_dir.glob("*.whl")}
    if {wheel.sha256 for wheel in read_lock(lock)} <= have:
        return
    _pip(python, "download", "--no-deps", "--require-hashes", "--index-url", PYPI,
         "-d", str(wheel_dir), *_pip_target_options(), "-r", str(lock))


def write_lock(out: Path, names: dict[str, str], python: str) -> None:
    """Pin `names` (name -> version) with the sha256 of the wheel pip picks for the
    image's platform: what `scripts/image.sh lock` writes."""
    with tempfile.TemporaryDirectory() as tmp:
        specs = [f"{name}=={version}" for name, version in sorted(names.items())]
        _pip(python, "download", "--no-deps", "--index-url", PYPI, "-d", tmp,
             *_pip_target_options(), *specs)
        files = {re.sub(r"[-_.]+", "-", p.name.split("-")[0]).lower(): p
                 for p in Path(tmp).iterdir()}
        lines = ["# The image's Python dependencies: exact versions, sha256 of each wheel.",
                 "# Regenerate with `scripts/image.sh lock` after changing pyproject.toml.", ""]
        for name, version in sorted(names.items()):
            wheel = files[re.sub(r"[-_.]+", "-", name).lower()]
            lines.append(f"{name}=={version} \\\n    --hash=sha256:{sha256_file(wheel)}")
        out.write_text("\n".join(lines) + "\n")


def install_dependencies(lock: Path, wheel_dir: Path, upper: Path, python: str) -> None:
    target = upper / SITE
    target.mkdir(parents=True, exist_ok=True)
    _pip(python, "install", "--no-index", "--find-links", str(wheel_dir), "--no-deps",
         "--require-hashes", "--no-compile", "--target", str(target),
         *_pip_target_options(), "-r", str(lock))
    shutil.rmtree(target / "bin", ignore_errors=True)  # scripts with the build host's #!


def tracked_files(repo: Path, subdir: str) -> list[str]:
    """The git-tracked files under `subdir`: a clean checkout's content, nothing local."""
    proc = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--", subdir],
                          capture_output=True, check=True)
    return sorted(p for p in proc.stdout.decode().split("\0") if p)


ENTRY_POINTS = {"flanneld": "pyflannel.daemon.main", "pyflannel": "pyflannel.cli"}


def install_pyflannel(repo: Path, upper: Path, version: str, requires: list[str]) -> None:
    site = upper / SITE
    for rel in tracked_files(repo, "src/pyflannel"):
        src = repo / rel
        dest = site / rel.removeprefix("src/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dest)
        else:
            shutil.copyfile(src, dest)
            dest.chmod(0o755 if os.access(src, os.X_OK) else 0o644)
    info = site / f"pyflannel-{version}.dist-info"
    info.mkdir()
    metadata = ["Metadata-Version: 2.1", "Name: pyflannel", f"Version: {version}",
                "License-Expression: Apache-2.0", *(f"Requires-Dist: {r}" for r in requires)]
    (info / "METADATA").write_text("\n".join(metadata) + "\n")
    (info / "INSTALLER").write_text("pyflannel-image\n")
    (info / "entry_points.txt").write_text(
        "[console_scripts]\n" + "".join(f"{k} = {v}:main\n" for k, v in ENTRY_POINTS.items()))
    bindir = upper / "usr/bin"
    bindir.mkdir(parents=True, exist_ok=True)
    for command, module in ENTRY_POINTS.items():
        script = bindir / command
        # -I: no PYTHON* variables, no user site, no current directory on sys.path.
        script.write_text(f"#!/usr/bin/python3 -I\nimport sys\nfrom {module} import main\n"
                          "sys.exit(main())\n")
        script.chmod(0o755)


# Names the stdlib files the CNI plugin can import: every module any import statement
# of the plugin names (also those inside functions), imported in a fresh `-I -S`
# interpreter as the plugin runs, and what that pulled in; plus all of `encodings`,
# which the interpreter loads at start-up for whatever locale the host has.
_PLUGIN_IMPORTS_CHILD = """
import sys
for name in sys.argv[1:]:
    __import__(name)
import encodings, os
here = os.path.dirname(encodings.__file__)
files = {m.__file__ for m in list(sys.modules.values()) if getattr(m, "__file__", None)}
files |= {os.path.join(here, f) for f in os.listdir(here) if f.endswith(".py")}
print(" ".join(sorted(files)))
"""
_FIND_PLUGIN_MODULES = "_CHILD = " + repr(_PLUGIN_IMPORTS_CHILD) + r"""
import ast, json, subprocess, sys
def plugin_modules(plugin):
    names = set()
    for node in ast.walk(ast.parse(open(plugin).read())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    out = subprocess.run([sys.executable, "-I", "-S", "-c", _CHILD, *sorted(names)],
                         capture_output=True, text=True, check=True).stdout
    return out.split()
"""
# Runs inside the image (chroot): imports every pyflannel module, then compiles what got
# loaded and what the plugin imports (PYTHONHASHSEED=0, unchecked-hash: reproducible).
_COMPILE = _FIND_PLUGIN_MODULES + r"""
import importlib.util, pkgutil, py_compile
import pyflannel
for info in sorted(pkgutil.walk_packages(pyflannel.__path__, "pyflannel."),
                   key=lambda i: i.name):
    __import__(info.name)
plugin = plugin_modules(sys.argv[1])
loaded = {m.__file__ for m in list(sys.modules.values()) if getattr(m, "__file__", None)}
for path in sorted(loaded | set(plugin)):
    if path.endswith(".py"):
        py_compile.compile(path, cfile=importlib.util.cache_from_source(path), doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
print(json.dumps(plugin))
"""


def run_in_image(tree: Path, upper: Path, argv: list[str]) -> str:
    """Run `argv` chrooted in an overlay of `tree` with writes going to `upper`;
    the overlay lives in a private mount namespace, so nothing stays mounted."""
    with tempfile.TemporaryDirectory(dir=upper.parent) as tmp:
        work, merged = Path(tmp) / "work", Path(tmp) / "merged"
        work.mkdir()
        merged.mkdir()
        script = ('mount -t overlay overlay -o "lowerdir=$1,upperdir=$2,workdir=$3" "$4" '
                  '&& shift 4 && exec chroot "$@"')
        env = {"PATH": "/usr/bin:/usr/sbin", "LC_ALL": "C.UTF-8", "PYTHONHASHSEED": "0",
               "PYTHONDONTWRITEBYTECODE": "1"}
        proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                               script, "sh", str(tree), str(upper), str(work), str(merged),
                               str(merged), *argv], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise PythonLayerError(f"{' '.join(argv)} in the image failed: "
                                   f"{proc.stderr.strip()[-2000:]}")
        # overlayfs leaves its work dir root-owned and mode 000; the TemporaryDirectory
        # cleanup copes with that.
        return proc.stdout


def compile_and_find_plugin_modules(tree: Path, upper: Path) -> list[str]:
    plugin = f"/{SITE}/pyflannel/cni/flannel_plugin.py"
    out = run_in_image(tree, upper, [f"/usr/bin/{PY}", "-s", "-B", "-c", _COMPILE, plugin])
    files: list[str] = json.loads(out.strip().splitlines()[-1])
    return files


def ldso_dependencies(root: Path, binary: str, loader: str) -> list[str]:
    """Absolute paths (in `root`) of the shared libraries `binary` links, as the loader
    resolves them (`ld.so --list`)."""
    argv = [loader, "--list", binary]
    if root != Path("/"):
        argv = ["chroot", str(root), *argv]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PythonLayerError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
    return sorted(m.group(1) for m in re.finditer(r"=> (/\S+)", proc.stdout))


def _package_version(package: str, root: Path) -> str | None:
    argv = ["dpkg-query", "-W", "-f", "${Version}", package]
    if root != Path("/"):
        argv[1:1] = ["--admindir", str(root / "var/lib/dpkg")]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        return None
    return proc.stdout.strip()


def libpython_dev(root: Path) -> Path:
    """Where libpython3.11-dev of `root`'s python3.11 version is unpacked: "/" when this
    machine has that version installed, else a per-machine cache of the package fetched
    from the machine's Debian mirror (the one the rootfs comes from)."""
    want = _package_version(f"{PY}-minimal", root)
    if want is None:
        raise PythonLayerError(f"{root} has no {PY}-minimal package")
    if _package_version(LIBPYTHON_PACKAGE, Path("/")) == want:
        return Path("/")
    cache = CACHE_ROOT / f"{LIBPYTHON_PACKAGE}_{want}"
    if (cache / LIBPYTHON).is_file():
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".libpython-", dir=cache.parent) as tmp:
        fetch = subprocess.run(["apt-get", "download", "-qq", f"{LIBPYTHON_PACKAGE}={want}"],
                               cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob("*.deb"))
        if fetch.returncode != 0 or len(debs) != 1:
            raise PythonLayerError(f"cannot fetch {LIBPYTHON_PACKAGE} {want} (the image's "
                                   f"{PY}) from this machine's apt sources: "
                                   f"{fetch.stderr.strip()[-500:]}")
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), f"{tmp}/tree"], check=True)
        if cache.exists():  # a concurrent build got there first
            return cache
        os.rename(f"{tmp}/tree", cache)
    return cache


def build_launcher(root: Path, out: Path) -> None:
    """Compile the CNI plugin's launcher into `out` with this machine's gcc and Debian's
    libpython3.11.a of `root`'s python3.11 version: the launcher runs bytecode compiled
    by that interpreter and loads its `_json` extension."""
    if shutil.which("gcc") is None:
        raise PythonLayerError("gcc is needed to build the CNI plugin's launcher "
                               "(scripts/setup.sh installs it)")
    dev = libpython_dev(root)
    # The include order makes pyconfig.h's multiarch `#include <x86_64-linux-gnu/...>`
    # find the unpacked package's, not this machine's.
    argv = ["gcc", "-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-no-pie", "-rdynamic",
            f"-ffile-prefix-map={LAUNCHER_SOURCE.parent}=.", f"-I{dev}/usr/include/{PY}",
            f"-I{dev}/usr/include",
            f"-Wl,--dynamic-linker={RUNTIME_INTERP_PLACEHOLDER}",
            # RPATH (not RUNPATH) so that it also applies to libraries' own dependencies
            # and to dlopen()ed extension modules.
            "-Wl,--disable-new-dtags", "-Wl,-rpath,$ORIGIN/../lib", "-Wl,--build-id=sha1",
            "-Wl,--wrap=_Py_Deepfreeze_Init",  # see launcher.c
            "-o", str(out), str(LAUNCHER_SOURCE), str(dev / LIBPYTHON), "-lm", "-lz", "-lexpat"]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PythonLayerError(f"building the CNI plugin's launcher failed: "
                               f"{proc.stderr.strip()[-2000:]}")
    out.chmod(0o755)


def build_cni_runtime(root: Path, runtime: Path, module_files: list[str],
                      overlay: Path | None = None) -> None:
    """Lay out the CNI runtime in `runtime`: bin/flannel-launcher (built here), lib/
    (links to the loader and libraries), lib/python3.11/lib-dynload/ (links to the
    extension modules the plugin imports).

    `root` is where absolute paths resolve: the image's merged tree, or "/" to build a
    runtime from this machine's own Debian python (the kernel tests do); files in
    `overlay` (the Python layer being built) hide those in `root`."""

    def resolve(path: str) -> Path:
        if overlay is not None and (overlay / path.lstrip("/")).exists():
            return overlay / path.lstrip("/")
        return root / path.lstrip("/")

    if shutil.which("patchelf") is None:
        raise PythonLayerError("patchelf is not installed (scripts/setup.sh installs it)")
    python = f"/usr/bin/{PY}"
    loader = read_elf_interpreter(root / python.lstrip("/"))
    (runtime / "bin").mkdir(parents=True)
    libdir = runtime / "lib"
    pylib = libdir / PY
    (pylib / "lib-dynload").mkdir(parents=True)
    launcher = runtime / LAUNCHER
    build_launcher(root, launcher)
    links: dict[Path, str] = {libdir / Path(loader).name: loader}
    dynload = [f for f in module_files if f.endswith(".so")]
    # The launcher links what python3.11 links (libpython is inside both).
    for lib in ldso_dependencies(root, python, loader) + [
            dep for so in dynload for dep in ldso_dependencies(root, so, loader)]:
        links[libdir / Path(lib).name] = lib
    needed = subprocess.run(["patchelf", "--print-needed", str(launcher)], check=True,
                            capture_output=True, text=True).stdout.split()
    missing = sorted(set(needed) - {link.name for link in links})
    if missing:
        raise PythonLayerError(f"the launcher needs {', '.join(missing)}, which "
                               f"{python} does not link")
    stdlib = f"/usr/lib/{PY}/"
    for path in module_files:
        if not path.startswith(stdlib):
            raise PythonLayerError(f"the CNI plugin imports {path}, outside the stdlib")
    # Only the extension modules: the launcher has no path-based importer, so the plugin
    # loads those by file name, and no .py module of the stdlib is ever read.
    for path in dynload:
        links[pylib / path.removeprefix(stdlib)] = path
    for link, target in sorted(links.items()):
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, link)
    manifest = {str(p.relative_to(runtime)): sha256_file(resolve(t))
                for p, t in links.items()}
    manifest[LAUNCHER] = sha256_file(launcher)
    (runtime / RUNTIME_MANIFEST).write_text(json.dumps(dict(sorted(manifest.items())),
                                                       indent=0) + "\n")


def host_plugin_modules(plugin: Path) -> list[str]:
    """The stdlib files the plugin imports, under this machine's Debian python."""
    script = _FIND_PLUGIN_MODULES + "print(json.dumps(plugin_modules(sys.argv[1])))"
    proc = subprocess.run([f"/usr/bin/{PY}", "-I", "-B", "-c", script, str(plugin)],
                          capture_output=True, text=True, check=True)
    files: list[str] = json.loads(proc.stdout)
    return files
