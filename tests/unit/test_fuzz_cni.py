"""Fuzzing the CNI plugin's inputs: stdin, subnet.env, the saved config and CNI_* variables.

The contract: every invocation ends with exit 0 or with exit 1 and a CNI error object on
stdout whose msg is one line, and never with an internal error (code 999, a bug of ours
caught by the plugin's last resort) or a traceback. In-process targets call the plugin's
functions; one subprocess target runs the real file under `python3 -I -S`.
Bounded budget: a few hundred examples per target, no deadline (the machine is shared).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyflannel.cni import flannel_plugin as plugin

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
PLUGIN = Path(plugin.__file__)
SAMPLE_ENV = ("FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\n"
              "FLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n")
# A stand-in delegate (a fake, named as such): succeeds with a fixed result.
FAKE_DELEGATE = """#!/bin/sh
cat > /dev/null
echo '{"cniVersion":"1.0.0","ips":[{"address":"10.1.17.2/24","gateway":"10.1.17.1"}]}'
"""


def depth_of(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((depth_of(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth_of(v) for v in value.values()), default=0)
    return 0


def check_result(status: int, output: bytes) -> dict[str, Any] | None:
    """The plugin's output obeys the CNI contract; returns the error object if any."""
    assert status in (0, 1)
    if status == 0:
        if output:
            json.loads(output)
        return None
    error = json.loads(output)
    assert isinstance(error, dict) and list(error)[:3] == ["cniVersion", "code", "msg"]
    assert error["cniVersion"] in plugin.SUPPORTED_VERSIONS
    assert isinstance(error["code"], int) and error["code"] != plugin.ERR_INTERNAL, error
    msg = error["msg"]
    assert isinstance(msg, str) and msg and "\n" not in msg and "\r" not in msg, error
    assert isinstance(error.get("details", ""), str)
    return error


# --------------------------------------------------------------------------- JSON scanner

_scalars = (st.none() | st.booleans() | st.integers(-(2**53), 2**53)
            | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
json_values = st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=25)


@FUZZ
@given(value=json_values, ascii_only=st.booleans())
def test_load_json_decodes_what_json_dumps_writes(value: Any, ascii_only: bool) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only)
    depth = depth_of(value)
    assert plugin.load_json(text.encode(), max_depth=max(depth, 1)) == value
    assert plugin.json_too_deep(text, depth) is False
    if depth > 0:
        assert plugin.json_too_deep(text, depth - 1) is True
        with pytest.raises(ValueError, match="nest deeper"):
            plugin.load_json(text, max_depth=depth - 1)
    # what we decode, go_json encodes back to the same value
    assert plugin.load_json(plugin.go_json(plugin.load_json(text))) == value


_json_chars = st.sampled_from(list('[]{}",:\\ 0123456789.eE+-truefalsnIiNy\n\x00') + ["é"])


@FUZZ
@given(data=st.text(_json_chars, max_size=300).map(str.encode) | st.binary(max_size=200))
def test_load_json_garbage_is_a_value_or_value_error(data: bytes) -> None:
    try:
        value = plugin.load_json(data, max_depth=8)
    except ValueError:
        return
    assert depth_of(value) <= 8
    plugin.go_json(value)  # everything we accept can be re-encoded (finite numbers)
    if isinstance(value, float):
        assert math.isfinite(value)


@FUZZ
@given(depth=st.integers(60, 5000), opener=st.sampled_from(["[", '{"k":', '["x",']))
def test_deep_nesting_never_recurses(depth: int, opener: str) -> None:
    closer = "]" if opener.startswith("[") else "}"
    text = opener * depth + "1" + closer * depth
    if depth > 64:
        with pytest.raises(ValueError, match="nest deeper than the limit of 64"):
            plugin.load_json(text)
    else:
        assert depth_of(plugin.load_json(text)) == depth


# --------------------------------------------------------------------------- subnet.env

_env_keys = st.sampled_from(["FLANNEL_NETWORK", "FLANNEL_SUBNET", "FLANNEL_IPV6_NETWORK",
                             "FLANNEL_IPV6_SUBNET", "FLANNEL_MTU", "FLANNEL_IPMASQ", "OTHER",
                             "flannel_mtu", " FLANNEL_MTU", "#"])
_env_values = st.sampled_from([
    "10.1.0.0/16", "10.1.17.1/24", "10.1.0.0/16,10.2.0.0/16,10.1.0.0/16", "fd00::/56",
    "fd00:1::1/64", "::ffff:10.0.0.1/120", "1472", "68", "65535", "0", "65536", "true",
    "false", "True", "", ",", "10.1.0.0/33", "10.01.0.0/16", "1.2.3.4/1" + "0" * 10,
    "10.1.0.0/16 ", "\x00", "\u0661\u0664\u0667\u0662"]) | st.text(max_size=30)
_env_lines = st.lists(st.tuples(_env_keys, st.sampled_from(["=", "", "=="]), _env_values)
                      .map(lambda kv: "".join(kv)), max_size=10)


@FUZZ
@given(lines=_env_lines, eol=st.sampled_from(["\n", "\r\n"]), base=st.booleans())
def test_subnet_env_parses_or_refuses_in_one_line(lines: list[str], eol: str,
                                                  base: bool) -> None:
    text = (SAMPLE_ENV if base else "") + eol.join(lines)
    try:
        env = plugin.parse_subnet_env(text.encode("utf-8", "surrogatepass"), "/run/x.env")
    except ValueError as err:
        message = str(err)
        assert "\n" not in message and "\r" not in message and message.startswith("/run/x.env")
        return
    assert env.networks or env.ipv6_networks
    assert env.mtu is not None and 68 <= env.mtu <= 65535
    assert env.ipmasq in (True, False)


# --------------------------------------------------------------------------- whole runs


class Box:
    """A sandbox directory with subnet.env, a data dir and fake delegates."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bin = root / "bin"
        self.bin.mkdir(exist_ok=True)
        for name in ("bridge", "ipvlan"):
            (self.bin / name).write_text(FAKE_DELEGATE)
            (self.bin / name).chmod(0o755)
        self.env = root / "subnet.env"
        self.data = root / "data"


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Box:
    return Box(tmp_path_factory.mktemp("cni-fuzz"))


_small = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
_routes = st.lists(st.fixed_dictionaries({}, optional={
    "dst": st.sampled_from(["10.9.0.0/16", "fd00::/64", "10.9.0.1/33", "x"]) | _small,
    "gw": st.sampled_from(["10.1.17.1", "", "fd00::1", "bad"]) | _small,
    "mtu": st.integers(-1, 1 << 40) | _small, "table": st.integers(0, 255) | _small,
    "scope": _small}) | _small, max_size=3)



def mostly(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`good` nine times in ten, else any small JSON value."""
    return st.sampled_from(range(10)).flatmap(lambda i: good if i < 9 else _small)


def _configs(box_root: str) -> st.SearchStrategy[dict[str, Any]]:
    """Mostly-valid CNI configs, so that runs get past decoding into the delegate config.
    Paths stay inside the sandbox (or are malformed): the fuzzer must not write elsewhere."""
    env_path, data_path = f"{box_root}/subnet.env", f"{box_root}/data"
    subnet_file = st.sampled_from([env_path] * 15 + [f"{box_root}/absent", f"{box_root}/bin",
                                                     "", "a\x00b", None])
    data_dir = st.sampled_from([data_path] * 15 + [env_path, "", "\x00", None])
    version = st.sampled_from(["1.0.0"] * 4 + ["1.1.0"] * 3 + ["0.4.0", "0.3.1", "0.2.0", "",
                                                             None])
    delegate_type = mostly(st.sampled_from(["bridge", "bridge", "ipvlan", "absent",
                                            "../bridge", "", "."]))
    return st.fixed_dictionaries({"subnetFile": subnet_file, "dataDir": data_dir,
                                  "cniVersion": version, "name": mostly(st.just("cbr0")),
                                  "type": st.just("flannel")}, optional={
        "delegate": mostly(st.fixed_dictionaries({}, optional={
            "type": delegate_type, "mtu": _small, "isGateway": _small, "ipMasq": _small,
            "name": _small, "ipam": _small})),
        "ipam": mostly(st.fixed_dictionaries({}, optional={
            "type": mostly(st.just("host-local")), "routes": _routes})),
        "runtimeConfig": mostly(st.dictionaries(st.text(max_size=5), _small, max_size=3)),
        "prevResult": mostly(st.fixed_dictionaries({}, optional={
            "ips": st.lists(mostly(st.fixed_dictionaries({}, optional={
                "gateway": mostly(st.sampled_from(["10.1.17.1", "fd00::1"]))})), max_size=2),
            "routes": _routes})),
    }).map(lambda c: {k: v for k, v in c.items() if v is not None})


_container_ids = st.sampled_from(["ctr1", "ctr2", "a" * 251, "../x", ".hidden", "-x", "é"]) \
    | st.text(st.sampled_from(list("abc09_.-/ ")), min_size=1, max_size=12)
_env_text = st.sampled_from(range(6)).flatmap(lambda i: (
    st.just(SAMPLE_ENV) if i < 3
    else _env_lines.map(lambda ls: SAMPLE_ENV + "\n".join(ls)) if i == 3
    else _env_lines.map("\n".join) if i == 4
    else st.binary(max_size=100).map(lambda b: b.decode("latin-1"))))
_ENVIRON = {"PATH": "/usr/bin:/bin", "CNI_CONTAINERID": "ctr1", "CNI_NETNS": "/var/run/netns/x",
            "CNI_IFNAME": "eth0"}


@FUZZ
@given(data=st.data(), command=st.sampled_from(["ADD", "ADD", "CHECK", "DEL", "STATUS", "GC"]),
       env_text=_env_text)
def test_any_config_obeys_the_cni_contract(box: Box, data: st.DataObject, command: str,
                                           env_text: str) -> None:
    box.env.write_text(env_text, encoding="utf-8", errors="surrogateescape")
    stdin = json.dumps(data.draw(_configs(str(box.root)))).encode()
    environ = {**_ENVIRON, "CNI_COMMAND": command, "CNI_PATH": str(box.bin)}
    status, output = plugin.run(environ, stdin)
    check_result(status, output)


@FUZZ
@given(data=st.data(), command=st.sampled_from(["ADD", "DEL", "CHECK", "STATUS", "GC",
                                                "VERSION", "FOO", "add"]),
       container_id=_container_ids, ifname=st.sampled_from(["eth0", "", "a/b", "x" * 16, ".."]),
       raw=st.booleans())
def test_any_environment_or_stdin_obeys_the_cni_contract(
        box: Box, data: st.DataObject, command: str, container_id: str, ifname: str,
        raw: bool) -> None:
    box.env.write_text(SAMPLE_ENV)
    if raw:
        stdin = data.draw(st.binary(max_size=200) | st.text(_json_chars, max_size=200)
                          .map(str.encode))
    else:
        stdin = json.dumps(data.draw(_configs(str(box.root)))).encode()
    environ = {**_ENVIRON, "CNI_COMMAND": command, "CNI_CONTAINERID": container_id,
               "CNI_IFNAME": ifname, "CNI_PATH": str(box.bin)}
    status, output = plugin.run(environ, stdin)
    check_result(status, output)


@FUZZ
@given(saved=st.binary(max_size=100) | json_values.map(lambda v: json.dumps(v).encode())
       | st.just(b"[" * 5000))
def test_any_saved_config_on_del_or_check_is_handled(box: Box, saved: bytes) -> None:
    box.env.write_text(SAMPLE_ENV)
    box.data.mkdir(exist_ok=True)
    (box.data / "ctr9").write_bytes(saved)
    conf = {"cniVersion": "1.0.0", "name": "n", "type": "flannel", "subnetFile": str(box.env),
            "dataDir": str(box.data), "prevResult": {}}
    environ = {**_ENVIRON, "CNI_CONTAINERID": "ctr9", "CNI_PATH": str(box.bin)}
    for command in ("CHECK", "DEL"):
        status, output = plugin.run({**environ, "CNI_COMMAND": command},
                                    json.dumps(conf).encode())
        check_result(status, output)


# --------------------------------------------------------------------------- the real file

_GARBAGE_STDIN = [b"", b"\xff\xfe", b"[" * 200_000, b'{"a":' * 50_000, b" " * (2 << 20),
                  b'{"cniVersion":"1.0.0","x":1e999}', b'{"x":' + b"9" * 5000 + b"}",
                  b'{"cniVersion":"1.0.0","name":"n","subnetFile":"a\\u0000b"}',
                  b'"\\ud800"', b"{}" * 1000]


@pytest.mark.parametrize("stdin", _GARBAGE_STDIN, ids=lambda b: repr(b[:20]))
@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK", "VERSION"])
def test_the_real_plugin_answers_garbage_with_a_cni_error(tmp_path: Path, stdin: bytes,
                                                          command: str) -> None:
    environ = {"PATH": "/usr/bin:/bin", "CNI_COMMAND": command, "CNI_CONTAINERID": "ctr1",
               "CNI_NETNS": "/x", "CNI_IFNAME": "eth0", "CNI_PATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-I", "-S", str(PLUGIN)], input=stdin, env=environ,
                          capture_output=True, timeout=60)
    assert b"Traceback" not in proc.stderr, proc.stderr.decode(errors="replace")
    if command == "VERSION":  # answers whatever stdin is
        assert proc.returncode == 0 and json.loads(proc.stdout)["cniVersion"]
        return
    error = check_result(proc.returncode, proc.stdout)
    assert error is not None and error["code"] in (plugin.ERR_DECODING,
                                                   plugin.ERR_INVALID_CONFIG)


@settings(max_examples=25, deadline=None)
@given(stdin=st.binary(max_size=300) | st.text(_json_chars, max_size=300).map(str.encode),
       env_value=st.binary(min_size=1, max_size=20).filter(lambda b: b"\0" not in b))
def test_the_real_plugin_with_random_stdin_and_undecodable_env(stdin: bytes,
                                                               env_value: bytes) -> None:
    environ = {b"PATH": b"/usr/bin:/bin", b"CNI_COMMAND": b"ADD", b"CNI_CONTAINERID": env_value,
               b"CNI_NETNS": b"/x", b"CNI_IFNAME": env_value[:15], b"CNI_PATH": b"/nonexistent"}
    proc = subprocess.run([sys.executable, "-I", "-S", str(PLUGIN)], input=stdin,
                          env=environ, capture_output=True, timeout=60)  # type: ignore[arg-type]
    assert b"Traceback" not in proc.stderr, proc.stderr.decode(errors="replace")
    check_result(proc.returncode, proc.stdout)
