"""A minimal container runtime for tests: runs a CNI network config list the way
libcni (containerd, CRI-O, kubelet's dockershim) does.

- ADD runs each plugin in order; every plugin after the first gets the previous
  plugin's result as `prevResult`; the last result is the attachment's result.
- DEL runs the plugins in reverse order, with the ADD result as `prevResult` for
  cniVersion >= 0.4.0.
- CHECK (cniVersion >= 0.4.0 only) runs each plugin in order with the ADD result.
- Each plugin config gets the list's `name` and `cniVersion`, and a `runtimeConfig`
  holding the capability arguments the plugin declares in `capabilities`.

The plugins run inside a "node" namespace through `ip netns exec <node>`, with
CNI_COMMAND/CNI_CONTAINERID/CNI_NETNS/CNI_IFNAME/CNI_ARGS/CNI_PATH set, so that
bridges, iptables rules and sysctls land in the node namespace and never in the
root one. Unlike libcni, ADD results are not cached on disk: the caller keeps them.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

JsonObject = dict[str, object]


class CniPluginError(RuntimeError):
    """A plugin failed; carries its CNI error object and stderr."""

    def __init__(self, plugin: str, command: str, status: int, error: JsonObject | None,
                 stdout: str, stderr: str) -> None:
        self.plugin = plugin
        self.command = command
        self.status = status
        self.error = error
        self.stdout = stdout
        self.stderr = stderr
        code = error.get("code") if error else None
        msg = error.get("msg") if error else stdout.strip()
        self.code = code if isinstance(code, int) else None
        self.msg = msg if isinstance(msg, str) else ""
        super().__init__(f"{plugin} {command} failed (exit {status}, code {self.code}): "
                         f"{self.msg} {stderr.strip()[-500:]}")


@dataclass
class Attachment:
    """One container's attachment to the network: what libcni calls RuntimeConf."""

    container_id: str
    netns: str  # a path, e.g. /run/netns/<name>
    ifname: str = "eth0"
    args: Mapping[str, str] = field(default_factory=dict)  # CNI_ARGS, e.g. K8S_POD_NAME
    capability_args: Mapping[str, object] = field(default_factory=dict)  # e.g. portMappings


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


class CniRuntime:
    """Executes one CNI network config list (a `.conflist`)."""

    def __init__(self, conflist: Mapping[str, object], plugin_dirs: Sequence[str | Path],
                 node: str | None = None, timeout: float = 60.0) -> None:
        plugins = conflist.get("plugins")
        if not isinstance(plugins, list) or not plugins:
            raise ValueError("the config list has no plugins")
        self.name = str(conflist.get("name", ""))
        self.cni_version = str(conflist.get("cniVersion", ""))
        self.plugins: list[JsonObject] = [dict(p) for p in plugins]
        self.plugin_dirs = [str(d) for d in plugin_dirs]
        self.node = node
        self.timeout = timeout

    @classmethod
    def from_file(cls, path: Path, plugin_dirs: Sequence[str | Path],
                  node: str | None = None) -> CniRuntime:
        loaded = json.loads(path.read_text())
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: not a JSON object")
        return cls(loaded, plugin_dirs, node)

    # ------------------------------------------------------------------ list operations

    def add(self, attachment: Attachment) -> JsonObject:
        """ADD through every plugin; return the final result."""
        result: JsonObject | None = None
        for plugin in self.plugins:
            result = self.invoke(self.plugin_config(plugin, attachment, result), "ADD",
                                 attachment)
            if result is None:
                raise CniPluginError(str(plugin.get("type")), "ADD", 0, None,
                                     "", "ADD printed no result")
        assert result is not None
        return result

    def check(self, attachment: Attachment, prev_result: JsonObject) -> None:
        if _version_tuple(self.cni_version) < (0, 4, 0):
            raise ValueError(f"configuration version {self.cni_version!r} does not support "
                             "the CHECK command")
        for plugin in self.plugins:
            self.invoke(self.plugin_config(plugin, attachment, prev_result), "CHECK",
                        attachment)

    def delete(self, attachment: Attachment, prev_result: JsonObject | None = None) -> None:
        """DEL through the plugins in reverse order."""
        if _version_tuple(self.cni_version) < (0, 4, 0):
            prev_result = None  # libcni passes no prevResult to pre-0.4.0 DELs
        for plugin in reversed(self.plugins):
            self.invoke(self.plugin_config(plugin, attachment, prev_result), "DEL",
                        attachment)

    # ------------------------------------------------------------------ one plugin

    def plugin_config(self, plugin: Mapping[str, object], attachment: Attachment,
                      prev_result: JsonObject | None) -> JsonObject:
        """The stdin config for one plugin of the list (libcni's buildOneConfig)."""
        config: JsonObject = dict(plugin)
        config["name"] = self.name
        config["cniVersion"] = self.cni_version
        capabilities = plugin.get("capabilities")
        runtime_config: JsonObject = {}
        if isinstance(capabilities, dict):
            for capability, enabled in capabilities.items():
                if enabled and capability in attachment.capability_args:
                    runtime_config[capability] = attachment.capability_args[capability]
        if runtime_config:
            config["runtimeConfig"] = runtime_config
        if prev_result is not None:
            config["prevResult"] = prev_result
        return config

    def find_plugin(self, plugin_type: str) -> str:
        if "/" in plugin_type or not plugin_type:
            raise ValueError(f"invalid plugin name {plugin_type!r}")
        for directory in self.plugin_dirs:
            candidate = os.path.join(directory, plugin_type)
            if os.path.isfile(candidate):
                return candidate
        raise FileNotFoundError(f"plugin {plugin_type!r} not in {self.plugin_dirs}")

    def environment(self, command: str, attachment: Attachment | None) -> dict[str, str]:
        # Our own CNI_* variables must not leak into the plugin's view.
        env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
        env["CNI_COMMAND"] = command
        env["CNI_PATH"] = ":".join(self.plugin_dirs)
        if attachment is not None:
            env["CNI_CONTAINERID"] = attachment.container_id
            env["CNI_NETNS"] = attachment.netns
            env["CNI_IFNAME"] = attachment.ifname
            env["CNI_ARGS"] = ";".join(f"{k}={v}" for k, v in attachment.args.items())
        return env

    def invoke(self, config: Mapping[str, object], command: str,
               attachment: Attachment | None) -> JsonObject | None:
        """Run one plugin; return its parsed stdout (None if empty) or raise."""
        plugin_type = str(config.get("type", ""))
        path = self.find_plugin(plugin_type)
        argv = ["ip", "netns", "exec", self.node, path] if self.node else [path]
        proc = subprocess.run(argv, input=json.dumps(config).encode(), capture_output=True,
                              env=self.environment(command, attachment), timeout=self.timeout)
        stdout = proc.stdout.decode("utf-8", "replace")
        stderr = proc.stderr.decode("utf-8", "replace")
        parsed: object = None
        if stdout.strip():
            try:
                parsed = json.loads(stdout)
            except ValueError:
                parsed = None
        if proc.returncode != 0:
            raise CniPluginError(plugin_type, command, proc.returncode,
                                 parsed if isinstance(parsed, dict) else None, stdout, stderr)
        if stdout.strip() and not isinstance(parsed, dict):
            raise CniPluginError(plugin_type, command, 0, None, stdout,
                                 f"{plugin_type} printed something that is not a JSON object")
        return parsed if isinstance(parsed, dict) else None

    def version(self, plugin_type: str) -> JsonObject:
        """VERSION of one plugin."""
        result = self.invoke({"type": plugin_type, "cniVersion": self.cni_version}, "VERSION",
                             None)
        if result is None:
            raise CniPluginError(plugin_type, "VERSION", 0, None, "", "VERSION printed nothing")
        return result
