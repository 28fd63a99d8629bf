"""Install the flannel CNI plugin and its network config, like flannel's install-cni
init containers do, but atomically: kubelet may exec the plugin or read the config
at any moment, so it must never see a half-written file.

In the image, the plugin comes with its own runtime (/usr/lib/pyflannel/cni-runtime:
the launcher, a CPython embedded and started only to its core (launcher.c), with the
loader, libraries and the stdlib modules the plugin imports), because many Kubernetes
hosts have no Python. install_plugin_with_runtime() copies it beside the plugin as
`.flannel-runtime-<id>/` (a complete directory renamed into place), writes the copied
loader's host path into the copied launcher's ELF header, then replaces `flannel`
(write, fsync, rename) with a script whose `#!` names that launcher and whose next lines
name the plugin's bytecode. The runtime an earlier `flannel` used stays until the next
upgrade, so a plugin run that started before the rename finishes with the files it
started with.

Under a host's Python (`--python`), `flannel` is a launcher of a few lines: its `#!`
starts the interpreter once (`-I -S`, nothing to re-exec) and it imports the plugin.

Either way the plugin's bytecode is in `.flannel-plugin-<id>/`, compiled here at install
time by the interpreter that runs it (unchecked-hash .pyc: the directory is named by its
content and never changes, so the source is never read). Compiling the 1,000 lines of
the plugin on every call was most of its start-up cost."""

from __future__ import annotations

import hashlib
import json
import os
import py_compile
import re
import secrets
import shutil
import struct
import subprocess
import sys
from importlib.util import cache_from_source
from pathlib import Path

PLUGIN_SOURCE = Path(__file__).with_name("flannel_plugin.py")
PLUGIN_NAME = "flannel"
IMAGE_RUNTIME = Path("/usr/lib/pyflannel/cni-runtime")
RUNTIME_MANIFEST = "MANIFEST.json"
RUNTIME_PREFIX = ".flannel-runtime-"
CODE_PREFIX = ".flannel-plugin-"
CODE_MODULE = "flannel_plugin"
LOADER_NAME = "ld-linux-x86-64.so.2"
LAUNCHER = "bin/flannel-launcher"
# The image's runtime interpreter has this ELF interpreter path, a valid but long
# spelling of the loader's, so install can write a host path of up to its length.
RUNTIME_INTERP_PLACEHOLDER = "/lib64/" + "/" * 200 + LOADER_NAME


class InstallError(ValueError):
    """The plugin could not be installed; the message says what is wrong."""


def _elf_interp_segment(data: bytes, path: Path) -> tuple[int, int]:
    """(file offset, size) of the PT_INTERP segment of a 64-bit little-endian ELF."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise InstallError(f"{path}: not a 64-bit little-endian ELF file")
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        p_type, _, p_offset = struct.unpack_from("<IIQ", data, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP
            p_filesz, = struct.unpack_from("<Q", data, phoff + i * phentsize + 0x20)
            return p_offset, p_filesz
    raise InstallError(f"{path}: no ELF interpreter (a static binary?)")


def read_elf_interpreter(path: Path) -> str:
    data = path.read_bytes()
    offset, size = _elf_interp_segment(data, path)
    return data[offset:offset + size].split(b"\0")[0].decode()


def set_elf_interpreter(path: Path, interpreter: str) -> None:
    """Write `interpreter` into the PT_INTERP segment in place (it must fit)."""
    data = bytearray(path.read_bytes())
    offset, size = _elf_interp_segment(bytes(data), path)
    raw = interpreter.encode()
    if len(raw) >= size:
        raise InstallError(f"the runtime path {interpreter!r} is longer than the "
                           f"{size - 1} bytes the interpreter leaves for it; install into a "
                           "shorter directory")
    data[offset:offset + size] = raw.ljust(size, b"\0")
    path.write_bytes(bytes(data))


def _write_atomically(dest: Path, content: bytes, mode: int, temp_name: str) -> None:
    """Write `content` to a temp file beside `dest`, fsync it, then rename over `dest`."""
    temp = dest.with_name(temp_name)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # the umask must not strip the execute bits kubelet needs
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        temp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.rename(temp, dest)
    # The rename itself is durable only once the directory entry is on disk.
    dir_fd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _check_interpreter_path(python: str) -> None:
    if not python or any(ch.isspace() for ch in python) or not os.path.isabs(python):
        # A shebang cannot quote: a path with spaces would split into arguments.
        raise ValueError(f"python must be an absolute path without whitespace: {python!r}")


def launcher_text(python: str, code_dir: str) -> bytes:
    """`flannel`: start `python` once, isolated and without site, and run the plugin
    from `code_dir` (its host path), imported from the bytecode compiled there."""
    _check_interpreter_path(python)
    # -I leaves the script's directory off sys.path; code_dir goes first, so the import
    # looks in no other directory (it holds nothing but the plugin).
    return (f"#!{python} -IS\n"
            "# The flannel CNI plugin of pyflannel, written by `pyflannel install-cni`.\n"
            "import sys\n"
            f"sys.path.insert(0, {code_dir!r})\n"
            f"from {CODE_MODULE} import run_and_exit\n"
            "run_and_exit()\n").encode()


def runtime_script_text(launcher: str, bytecode: str, dynload: str) -> bytes:
    """`flannel` with its own runtime: the kernel runs `launcher flannel ...`, which reads
    the paths of the plugin's bytecode and of the runtime's extension modules from here."""
    for path in (launcher, bytecode, dynload):
        _check_interpreter_path(path)
    return (f"#!{launcher}\n"
            "# The flannel CNI plugin of pyflannel, written by `pyflannel install-cni`.\n"
            f"code {bytecode}\n"
            f"dynload {dynload}\n").encode()


# optimize=2 drops the docstrings (the plugin has no asserts and reads no docstring): a
# tenth less bytecode to read and unmarshal on every call. It is written under the plain
# cache name, the one a launcher without -O looks for.
_COMPILE_CHILD = """
import py_compile, sys
from importlib.util import cache_from_source
py_compile.compile(sys.argv[1], cfile=cache_from_source(sys.argv[1]), doraise=True, optimize=2,
                   invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
"""


def _install_code(dest_dir: Path, host: Path, python: str, compile_with: str | None) -> str:
    """Put the plugin and its bytecode in `<dest_dir>/.flannel-plugin-<id>/` (complete
    before it is renamed into place); return the directory's name.

    The bytecode must be for the interpreter that runs the plugin: `compile_with` is that
    interpreter as the installer can run it, or None when it is our own version."""
    source = PLUGIN_SOURCE.read_bytes()
    ident = hashlib.sha256(source + b"\0" + python.encode() + b"\0" + str(host).encode())
    name = CODE_PREFIX + ident.hexdigest()[:16]
    final = dest_dir / name
    module = f"{CODE_MODULE}.py"
    if (final / module).is_file():
        return name  # complete: it is renamed into place only once compiled
    temp = dest_dir / f"{name}.tmp-{secrets.token_hex(4)}"
    try:
        temp.mkdir(mode=0o755)
        (temp / module).write_bytes(source)
        if compile_with is None:
            source_path = str(temp / module)
            py_compile.compile(source_path, cfile=cache_from_source(source_path), doraise=True,
                               optimize=2,
                               invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
        elif not _compile_with(compile_with, temp / module):
            # The host's interpreter is not visible here (an init container): the plugin's
            # first call compiles and caches it beside the source instead (no -B).
            sys.stderr.write(f"note: {compile_with} cannot be run here, so the plugin's "
                             "bytecode is written by its first call\n")
        for path in (temp / module, *(temp / "__pycache__").glob("*")):
            path.chmod(0o644)
        if (temp / "__pycache__").exists():
            (temp / "__pycache__").chmod(0o755)
        _fsync_tree(temp)
        if final.exists():  # a leftover without its module: incomplete, replace it
            shutil.rmtree(final)
        os.rename(temp, final)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return name


def _compile_with(python: str, source: Path) -> bool:
    """Compile `source` with `python` (the interpreter that will run it); False if that
    interpreter cannot be run here at all."""
    try:
        proc = subprocess.run([python, "-I", "-S", "-c", _COMPILE_CHILD, str(source)],
                              capture_output=True, text=True, timeout=120)
    except OSError:
        return False
    if proc.returncode != 0:
        raise InstallError(f"{python} cannot compile the plugin: "
                           f"{proc.stderr.strip()[-500:]}")
    if not list((source.parent / "__pycache__").glob(f"{CODE_MODULE}.*.pyc")):
        raise InstallError(f"{python} compiled {source.name} but wrote no bytecode")
    return True


def _replace_launcher(dest_dir: Path, content: bytes, code_dir: str,
                      runtime_dir: str | None = None) -> Path:
    """Write `flannel` (write, fsync, rename) as `content`, which runs the plugin in
    `code_dir`, then drop the runtimes and plugin directories that neither it nor the
    `flannel` it replaced uses (a call that started before the rename still finds its
    files)."""
    plugin = dest_dir / PLUGIN_NAME
    keep = {code_dir, *([runtime_dir] if runtime_dir else []), *_referenced_dirs(plugin)}
    _write_atomically(plugin, content, 0o755, f".{PLUGIN_NAME}.tmp")
    for old in (*dest_dir.glob(RUNTIME_PREFIX + "*"), *dest_dir.glob(CODE_PREFIX + "*")):
        if old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)
    return plugin


def install_plugin(dest_dir: Path, python: str = sys.executable,
                   host_dir: Path | None = None) -> Path:
    """Install `<dest_dir>/flannel` (mode 0755) to run under the host's `python`, with
    its bytecode compiled by that interpreter; return its path.

    `-IS` (isolated, no site) keeps the root-run plugin clear of PYTHON* variables and
    site-packages hooks and saves most of the interpreter's start-up time."""
    _check_interpreter_path(python)
    host = _host_path(dest_dir, host_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    code = _install_code(dest_dir, host, python, python)
    return _replace_launcher(dest_dir, launcher_text(python, str(host / code)), code)


def _host_path(dest_dir: Path, host_dir: Path | None) -> Path:
    host = host_dir if host_dir is not None else dest_dir.absolute()
    if not host.is_absolute():
        raise InstallError(f"--host-dir must be an absolute path: {str(host)!r}")
    return host


def _referenced_dirs(plugin: Path) -> set[str]:
    """The runtime and plugin directories the installed `flannel` names (none for a
    plugin installed as one file, as before the launcher)."""
    try:
        with plugin.open("rb") as f:
            head = f.read(4096)
    except OSError:
        return set()
    names = re.findall(rb"\.flannel-(?:runtime|plugin)-[0-9a-f]{16}(?![0-9a-f.])", head)
    return {name.decode() for name in names}


def _fsync_tree(top: Path) -> None:
    for directory, _, files in os.walk(top):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def install_plugin_with_runtime(dest_dir: Path, runtime: Path = IMAGE_RUNTIME,
                                host_dir: Path | None = None) -> Path:
    """Install `flannel` plus a copy of `runtime` into `dest_dir`; return the plugin path.

    `host_dir` is where the host sees `dest_dir` (default: the same path), because the
    plugin's `#!` and the interpreter's loader path are read by the host's kernel."""
    manifest_path = runtime / RUNTIME_MANIFEST
    try:
        manifest = json.loads(manifest_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise InstallError(f"no usable CNI runtime at {runtime} ({exc}); this is not the "
                           "pyflannel image: pass --python to install a plugin that runs "
                           "under that interpreter") from None
    host = _host_path(dest_dir, host_dir)
    ident = hashlib.sha256(manifest_path.read_bytes() + str(host).encode()).hexdigest()[:16]
    name = RUNTIME_PREFIX + ident
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / name
    launcher = f"{host / name}/{LAUNCHER}"
    if not (final / RUNTIME_MANIFEST).is_file():
        temp = dest_dir / f"{name}.tmp-{secrets.token_hex(4)}"
        try:
            # Links resolved: the host gets the files, not links into the image.
            shutil.copytree(runtime, temp, symlinks=False)
            for rel, digest in manifest.items():
                if rel != LAUNCHER and _sha256(temp / rel) != digest:
                    raise InstallError(f"{runtime / rel}: content differs from {manifest_path}")
            if LAUNCHER not in manifest:
                raise InstallError(f"{runtime} has no {LAUNCHER}: an image older than this "
                                   "installer? The image is inconsistent")
            set_elf_interpreter(temp / LAUNCHER, f"{host / name}/lib/{LOADER_NAME}")
            _fsync_tree(temp)
            if final.exists():  # a leftover without its manifest: incomplete, replace it
                shutil.rmtree(final)
            os.rename(temp, final)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
    # The runtime is a copy of the interpreter this installer runs on (the image's), so
    # the bytecode compiled here is the runtime's; anything else is a broken image.
    runtime_lib = f"python{sys.version_info.major}.{sys.version_info.minor}"
    if not (final / "lib" / runtime_lib).is_dir():
        raise InstallError(f"the runtime at {runtime} is not for {runtime_lib}, the Python "
                           "this installer runs on; the image is inconsistent")
    code = _install_code(dest_dir, host, launcher, None)
    pyc = cache_from_source(f"{host / code}/{CODE_MODULE}.py")
    script = runtime_script_text(launcher, pyc, f"{host / name}/lib/{runtime_lib}/lib-dynload")
    return _replace_launcher(dest_dir, script, code, name)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def install_conf(src: Path, dst: Path) -> None:
    """Copy a CNI config to `dst` through `.<name>.tmp` in the same directory and a
    rename, as upstream's install-conf does, so a reader never sees a partial file."""
    content = src.read_bytes()
    dst.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(dst, content, 0o644, f".{dst.name}.tmp")
