"""Install the flannel CNI plugin and its network config, like flannel's install-cni
init containers do, but atomically: kubelet may exec the plugin or read the config
at any moment, so it must never see a half-written file."""

from __future__ import annotations

import os
import sys
from pathlib import Path

PLUGIN_SOURCE = Path(__file__).with_name("flannel_plugin.py")
PLUGIN_NAME = "flannel"


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


def install_conf(src: Path, dst: Path) -> None:
    """Copy a CNI config to `dst` through `.<name>.tmp` in the same directory and a
    rename, as upstream's install-conf does, so a reader never sees a partial file."""
    content = src.read_bytes()
    dst.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(dst, content, 0o644, f".{dst.name}.tmp")
