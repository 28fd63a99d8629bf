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
- The CNI runtime (/usr/lib/pyflannel/cni-runtime): the interpreter, copied and given a
  long placeholder ELF interpreter path and RPATH $ORIGIN/../lib, and symlinks to the
  loader, libraries and stdlib modules the plugin imports. `pyflannel install-cni` copies
  it to the host with the links resolved and writes the real loader path into the copy.
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
    RUNTIME_INTERP_PLACEHOLDER,
    RUNTIME_MANIFEST,
    read_elf_interpreter,
)
from pyflannel_lab.image.oci import sha256_file

PY = "python3.11"
SITE = "usr/lib/python3/dist-packages"
RUNTIME_DIR = "usr/lib/pyflannel/cni-runtime"
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
    """Download the locked wheels into `wheel_dir` (a no-op when all are there: pip
    checks the hashes of files it already has)."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
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


def build_cni_runtime(root: Path, runtime: Path, module_files: list[str],
                      overlay: Path | None = None) -> None:
    """Lay out the CNI runtime in `runtime`: bin/python3 (patched copy), lib/ (links to
    the loader and libraries), lib/python3.11/ (links to the plugin's stdlib modules).

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
    binary = runtime / "bin" / "python3"
    shutil.copyfile(root / python.lstrip("/"), binary)
    binary.chmod(0o755)
    # RPATH (not RUNPATH) so that it also applies to libraries' own dependencies and to
    # dlopen()ed extension modules; the placeholder reserves room for the host path.
    subprocess.run(["patchelf", "--set-interpreter", RUNTIME_INTERP_PLACEHOLDER,
                    "--force-rpath", "--set-rpath", "$ORIGIN/../lib", str(binary)], check=True)
    links: dict[Path, str] = {libdir / Path(loader).name: loader}
    dynload = [f for f in module_files if f.endswith(".so")]
    for lib in ldso_dependencies(root, python, loader) + [
            dep for so in dynload for dep in ldso_dependencies(root, so, loader)]:
        links[libdir / Path(lib).name] = lib
    stdlib = f"/usr/lib/{PY}/"
    for path in module_files:
        if not path.startswith(stdlib):
            raise PythonLayerError(f"the CNI plugin imports {path}, outside the stdlib")
        rel = path.removeprefix(stdlib)
        links[pylib / rel] = path
        if path.endswith(".py"):
            cached = "/".join([*rel.split("/")[:-1], "__pycache__",
                               rel.split("/")[-1][:-3] + ".cpython-311.pyc"])
            if resolve(stdlib + cached).is_file():
                links[pylib / cached] = stdlib + cached
    for link, target in sorted(links.items()):
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, link)
    manifest = {str(p.relative_to(runtime)): sha256_file(resolve(t))
                for p, t in links.items()}
    manifest["bin/python3"] = sha256_file(binary)
    (runtime / RUNTIME_MANIFEST).write_text(json.dumps(dict(sorted(manifest.items())),
                                                       indent=0) + "\n")


def host_plugin_modules(plugin: Path) -> list[str]:
    """The stdlib files the plugin imports, under this machine's Debian python."""
    script = _FIND_PLUGIN_MODULES + "print(json.dumps(plugin_modules(sys.argv[1])))"
    proc = subprocess.run([f"/usr/bin/{PY}", "-I", "-B", "-c", script, str(plugin)],
                          capture_output=True, text=True, check=True)
    files: list[str] = json.loads(proc.stdout)
    return files
