"""Install the flannel CNI plugin and its network config, like flannel's install-cni
init containers do, but atomically: kubelet may exec the plugin or read the config
at any moment, so it must never see a half-written file.

In the image, the plugin comes with its own runtime (/usr/lib/pyflannel/cni-runtime:
the interpreter, loader, libraries and the stdlib modules the plugin imports), because
many Kubernetes hosts have no Python. install_plugin_with_runtime() copies it beside the
plugin as `.flannel-runtime-<id>/` (a complete directory renamed into place), writes the
copied loader's host path into the copied interpreter's ELF header, then replaces
`flannel` (write, fsync, rename) with the plugin whose `#!` names that interpreter. The
runtime an earlier `flannel` used stays until the next upgrade, so a plugin run that
started before the rename finishes with the files it started with."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import struct
import sys
from pathlib import Path

PLUGIN_SOURCE = Path(__file__).with_name("flannel_plugin.py")
PLUGIN_NAME = "flannel"
IMAGE_RUNTIME = Path("/usr/lib/pyflannel/cni-runtime")
RUNTIME_MANIFEST = "MANIFEST.json"
RUNTIME_PREFIX = ".flannel-runtime-"
LOADER_NAME = "ld-linux-x86-64.so.2"
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


def plugin_text(python: str = sys.executable) -> bytes:
    """The plugin source with a `#!<python> -IS` shebang in place of its sh one."""
    if not python or any(ch.isspace() for ch in python) or not os.path.isabs(python):
        # A shebang cannot quote: a path with spaces would split into arguments.
        raise ValueError(f"python must be an absolute path without whitespace: {python!r}")
    source = PLUGIN_SOURCE.read_bytes()
    _, _, rest = source.partition(b"\n")
    return f"#!{python} -IS\n".encode() + rest


def install_plugin(dest_dir: Path, python: str = sys.executable) -> Path:
    """Write the plugin to `<dest_dir>/flannel` (mode 0755) atomically; return its path.

    `-IS` (isolated, no site) keeps the root-run plugin clear of PYTHON* variables and
    site-packages hooks and saves most of the interpreter's start-up time."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / PLUGIN_NAME
    _write_atomically(dest, plugin_text(python), 0o755, f".{PLUGIN_NAME}.tmp")
    return dest


def _shebang_target(plugin: Path) -> str | None:
    try:
        with plugin.open("rb") as f:
            first = f.readline(512)
    except OSError:
        return None
    return first[2:].split()[0].decode() if first.startswith(b"#!") and first[2:].split() \
        else None


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
    host = host_dir if host_dir is not None else dest_dir
    if not host.is_absolute():
        raise InstallError(f"--host-dir must be an absolute path: {str(host)!r}")
    ident = hashlib.sha256(manifest_path.read_bytes() + str(host).encode()).hexdigest()[:16]
    name = RUNTIME_PREFIX + ident
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / name
    interpreter = f"{host / name}/bin/python3"
    if not (final / RUNTIME_MANIFEST).is_file():
        temp = dest_dir / f"{name}.tmp-{secrets.token_hex(4)}"
        try:
            # Links resolved: the host gets the files, not links into the image.
            shutil.copytree(runtime, temp, symlinks=False)
            for rel, digest in manifest.items():
                if rel != "bin/python3" and _sha256(temp / rel) != digest:
                    raise InstallError(f"{runtime / rel}: content differs from {manifest_path}")
            set_elf_interpreter(temp / "bin/python3", f"{host / name}/lib/{LOADER_NAME}")
            _fsync_tree(temp)
            if final.exists():  # a leftover without its manifest: incomplete, replace it
                shutil.rmtree(final)
            os.rename(temp, final)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
    plugin = dest_dir / PLUGIN_NAME
    previous = _shebang_target(plugin)
    _write_atomically(plugin, plugin_text(interpreter), 0o755, f".{PLUGIN_NAME}.tmp")
    keep = {name}
    if previous and previous.startswith(f"{host}/{RUNTIME_PREFIX}"):
        keep.add(previous.removeprefix(f"{host}/").split("/")[0])
    for old in dest_dir.glob(RUNTIME_PREFIX + "*"):
        if old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)
    return plugin


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
