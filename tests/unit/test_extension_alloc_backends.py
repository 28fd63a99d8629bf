"""The extension and alloc backends: option parsing, the pure parts (expansion, peer hooks,
the run plan, DesiredTable's hooks), the real subprocess runner on harmless commands, and
the daemon loop on fakes (FakeCommands, InMemoryStore, FakeKernel)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator
from ipaddress import IPv4Address, IPv4Network, IPv6Network
from pathlib import Path
from typing import Literal

import pytest

from pyflannel.backend.base import DesiredTable, PeerState
from pyflannel.backend.extension import (
    extension_peer_hook,
    go_json_string,
    peer_stdin,
)
from pyflannel.backend.registry import REFUSED, unknown_backend_message
from pyflannel.config.flags import parse_flags
from pyflannel.config.netconf import (
    ExtensionOptions,
    NetConfError,
    extension_options,
    parse_netconf,
)
from pyflannel.daemon.main import EXIT_ERROR, Daemon
from pyflannel.lease.events import LeaseUpdate
from pyflannel.lease.model import Lease, LeaseAttrs
from pyflannel.platform import Platform
from pyflannel.reconcile.hookrunner import HookRunner, SubprocessCommands
from pyflannel.reconcile.hooks import (
    CommandResult,
    HookRun,
    PeerHook,
    expand,
    plan_hooks,
    split_command,
)
from pyflannel.subnet.subnetenv import read_subnet_env
from tests.fakes.commands import FakeCommands
from tests.fakes.kernel import FakeKernel
from tests.fakes.rules import FakeRules
from tests.fakes.store import InMemoryStore
from tests.waiting import until

# -- options --------------------------------------------------------------------------------


def ext_conf(**backend: object) -> str:
    return json.dumps({"Network": "10.244.0.0/16", "Backend": {"Type": "extension", **backend}})


def test_options_are_matched_case_insensitively_and_null_is_unset() -> None:
    nc = parse_netconf(ext_conf(prestartupcommand="pre x", POSTSTARTUPCOMMAND=None,
                                SubnetAddCommand="ip route replace $SUBNET via $PUBLIC_IP",
                                subnetRemoveCommand="ip route del $SUBNET", Other=5))
    assert extension_options(nc) == ExtensionOptions(
        pre_startup_command="pre x", subnet_add_command="ip route replace $SUBNET via $PUBLIC_IP",
        subnet_remove_command="ip route del $SUBNET")
    assert extension_options(parse_netconf(ext_conf())) == ExtensionOptions()


@pytest.mark.parametrize(("value", "message"), [
    (5, "Backend.SubnetAddCommand: expected a string with a command line, got number 5"),
    (["ip"], "Backend.SubnetAddCommand: expected a string with a command line, got array"),
    ("  \t", "Backend.SubnetAddCommand: expected a command line, got only white space"),
])
def test_bad_options_are_one_line_errors_naming_the_field(value: object, message: str) -> None:
    with pytest.raises(NetConfError) as e:
        extension_options(parse_netconf(ext_conf(SubnetAddCommand=value)))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


# -- pure parts -----------------------------------------------------------------------------


@pytest.mark.parametrize(("word", "want"), [
    ("$SUBNET", "10.244.2.0/24"), ("${SUBNET}", "10.244.2.0/24"),
    ("a$SUBNET-b", "a10.244.2.0/24-b"), ("$NOPE", ""), ("x${NOPE}y", "xy"),
    ("$", "$"), ("a$", "a$"), ("$%", "$%"), ("${}", ""), ("${abc", "abc"),
    ("$1", ""), ("${?}", ""), ("$$", ""), ("$SUBNET$PUBLIC_IP", "10.244.2.0/24192.168.7.2"),
    ("$PUBLIC_IP.x", "192.168.7.2.x"), ("no vars", "no vars"),
])
def test_expand_is_gos_os_expand(word: str, want: str) -> None:
    env = {"SUBNET": "10.244.2.0/24", "PUBLIC_IP": "192.168.7.2"}
    assert expand(word, env) == want


def test_a_value_never_becomes_more_words() -> None:
    # expansion comes after the split: a value with spaces stays one argument
    words = split_command("echo  $X\tdone")
    assert words == ("echo", "$X", "done")
    assert [expand(w, {"X": "a b; rm -rf /"}) for w in words] == ["echo", "a b; rm -rf /",
                                                                   "done"]


def test_go_json_string_escapes_as_go_does() -> None:
    assert go_json_string("hello") == '"hello"'
    assert go_json_string("") == '""'
    assert go_json_string('a<b>&"c"\n\u00e9\u2028') == \
        '"a\\u003cb\\u003e\\u0026\\"c\\"\\n\u00e9\\u2028"'


def lease(n: int, data: str = "", *, ip: str | None = None, v6: bool = False) -> Lease:
    return Lease(IPv4Network(f"10.244.{n}.0/24"), LeaseAttrs(
        public_ip=IPv4Address(ip or f"192.168.7.{n}"), backend_type="extension",
        backend_data=data), ipv6_subnet=IPv6Network(f"fd00:{n}::/64") if v6 else None)


OPTS = ExtensionOptions(subnet_add_command="add $SUBNET", subnet_remove_command="del $SUBNET")


def test_peer_hook_has_upstreams_environment_and_stdin() -> None:
    h = extension_peer_hook(lease(2, '"hello world"'), OPTS)
    assert h == PeerHook(add=("add", "$SUBNET"), remove=("del", "$SUBNET"),
                         env=(("SUBNET", "10.244.2.0/24"), ("PUBLIC_IP", "192.168.7.2")),
                         stdin="hello world")
    h6 = extension_peer_hook(lease(3, v6=True), OPTS)
    assert h6 is not None and h6.get("IPV6SUBNET") == "fd00:3::/64" and h6.stdin == ""
    assert extension_peer_hook(lease(2), ExtensionOptions(pre_startup_command="x")) is None


@pytest.mark.parametrize(("data", "problem"), [
    ('{"VNI":1}', "cannot unmarshal object into Go value of type string"),
    ("5", "cannot unmarshal number into Go value of type string"),
    ("true", "cannot unmarshal bool"),
])
def test_backend_data_that_is_no_string_runs_nothing(data: str, problem: str) -> None:
    stdin, why = peer_stdin(data)
    assert stdin == "" and why.startswith("failed to unmarshal BackendData") and problem in why


def hook(subnet: str, stdin: str = "") -> PeerHook:
    return PeerHook(("add",), ("del",), (("SUBNET", subnet), ("PUBLIC_IP", "192.168.7.2")),
                    stdin)


def test_plan_hooks() -> None:
    a, a2, b = hook("10.244.2.0/24"), hook("10.244.2.0/24", "new data"), hook("10.244.3.0/24")
    assert plan_hooks({"k": a}, {}, ["k"]) == [run("k", "add", a)]
    assert plan_hooks({"k": a}, {"k": a}, ["k"]) == []  # a renewal: unchanged, nothing runs
    assert plan_hooks({"k": a2}, {"k": a}, ["k"]) == [run("k", "add", a2)]  # as upstream
    assert plan_hooks({}, {"k": a}, ["k"]) == [run("k", "remove", a)]
    # same ident, another subnet (a kube node's new podCIDR): the old one is removed first
    assert plan_hooks({"k": b}, {"k": a}, ["k"]) == [run("k", "remove", a), run("k", "add", b)]
    assert plan_hooks({"k": a}, {}, []) == []  # only the changed idents are looked at


def run(ident: str, action: Literal["add", "remove"], h: PeerHook) -> HookRun:
    return HookRun(ident, action, h)


def test_desired_table_keeps_hooks_per_lease() -> None:
    t = DesiredTable()
    a, b = hook("10.244.2.0/24"), hook("10.244.2.0/24")
    t.put("one", PeerState(hook=a))
    t.put("two", PeerState(hook=b))
    assert t.hooks == {"one": a, "two": b} and t.hooks_changed == {"one", "two"}
    t.hooks_changed.clear()
    t.remove("one")
    assert t.hooks == {"two": b} and t.hooks_changed == {"one"}
    t.put("three", PeerState())  # no hook: nothing tracked
    assert "three" not in t.hooks


# -- the runner -----------------------------------------------------------------------------


async def test_runner_runs_adds_and_removes_and_logs_a_failing_peer_once(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    fake = FakeCommands(results={"bad": CommandResult("exit status 3", "oops")})
    runner = HookRunner(fake)
    task = asyncio.create_task(runner.run())
    try:
        good = PeerHook(("good", "$SUBNET"), ("undo",), (("SUBNET", "10.244.2.0/24"),
                                                         ("PUBLIC_IP", "192.168.7.2")), "in")
        runner.update({"p2": good}, {"p2"})
        await asyncio.wait_for(runner.wait_idle(), 2)
        assert [(c.words, c.env["SUBNET"], c.stdin) for c in fake.calls] == [
            (("good", "$SUBNET"), "10.244.2.0/24", "in")]
        bad = PeerHook(("bad",), (), (("SUBNET", "10.244.3.0/24"), ("PUBLIC_IP", "x")))
        bad2 = PeerHook(("bad", "again"), (), bad.env)
        runner.update({"p3": bad}, {"p3"})
        await asyncio.wait_for(runner.wait_idle(), 2)
        runner.update({"p3": bad2}, {"p3"})
        await asyncio.wait_for(runner.wait_idle(), 2)
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert [r.getMessage() for r in errors] == [
            "failed to run command: bad Err: exit status 3 Output: oops"]
        runner.update({}, {"p2", "p3"})  # both leave; p3 has no remove command
        await asyncio.wait_for(runner.wait_idle(), 2)
        assert [c.words for c in fake.calls][-1] == ("undo",)
        assert runner.ran == 4 and runner.failed == 2
        fake.raises = RuntimeError("port bug")
        runner.update({"p4": good}, {"p4"})
        await asyncio.wait_for(runner.wait_idle(), 2)  # logged, the runner carries on
        assert not task.done()
    finally:
        task.cancel()


async def test_a_problem_peer_runs_nothing() -> None:
    fake = FakeCommands()
    runner = HookRunner(fake)
    task = asyncio.create_task(runner.run())
    try:
        runner.update({"p": PeerHook(("add",), ("del",), (("SUBNET", "s"),), problem="no")},
                      {"p"})
        await asyncio.wait_for(runner.wait_idle(), 2)
        assert fake.calls == []
    finally:
        task.cancel()


# -- the real subprocess runner, on harmless commands ------------------------------------------

SH = ("/bin/sh", "-c")


async def test_subprocess_gets_env_stdin_and_gives_trimmed_output() -> None:
    port = SubprocessCommands(environ={"PATH": os.environ.get("PATH", ""), "KEEP": "k"})
    res = await port.run((*SH, 'printf "%s|%s|" "$SUBNET" "$KEEP"; cat; echo err >&2'),
                         {"SUBNET": "10.244.2.0/24"}, "from stdin", timeout=10)
    assert res == CommandResult("", "10.244.2.0/24|k|from stdin\nerr")
    # words are expanded before exec, from the same environment
    res = await port.run(("/bin/echo", "$SUBNET", "${KEEP}x"), {"SUBNET": "a b"}, "",
                         timeout=10)
    assert res.output == "a b kx"


async def test_subprocess_failures_are_results_not_exceptions() -> None:
    port = SubprocessCommands(max_output=100)
    assert (await port.run((*SH, "echo no; exit 7"), {}, "", timeout=10)) == \
        CommandResult("exit status 7", "no")
    res = await port.run(("/nonexistent/cmd",), {}, "", timeout=10)
    assert res.error == 'exec: "/nonexistent/cmd": executable file not found in $PATH'
    res = await port.run((*SH, "head -c 5000 /dev/zero | tr '\\0' x"), {}, "", timeout=10)
    assert res.error == "" and len(res.output) == 100 and res.dropped == 4900
    # a hung command is killed, with what it started (its own process group)
    res = await port.run((*SH, "sleep 30 & sleep 30"), {}, "", timeout=0.3)
    assert res.error == "timed out after 0.3 s (killed)"


# -- the daemon loop on fakes -------------------------------------------------------------------


def platform(kernel: FakeKernel, store: InMemoryStore, commands: FakeCommands) -> Platform:
    return Platform(open_routes=lambda: kernel, links=kernel,
                    find_interface=kernel.find_interface, make_rules=lambda _nft: FakeRules(),
                    make_store=lambda _f, _e: store, br_netfilter=lambda _4, _6: None,
                    commands=commands)



async def start_daemon(tmp_path: Path, store: InMemoryStore, commands: FakeCommands
                       ) -> tuple[Daemon, asyncio.Task[int], FakeKernel]:
    kernel = FakeKernel()
    flags = parse_flags([f"--subnet-file={tmp_path / 'subnet.env'}"], {})
    d = Daemon(flags, platform(kernel, store, commands))
    task = asyncio.create_task(d.run())
    await until(lambda: d.ready or task.done(), "start-up")
    return d, task, kernel


async def stop(d: Daemon, task: asyncio.Task[int]) -> int:
    if not task.done():
        d._stop.set()
    return await asyncio.wait_for(task, 5)


async def test_daemon_with_extension(tmp_path: Path) -> None:
    store = InMemoryStore(ext_conf(PreStartupCommand="mkdata", PostStartupCommand="post",
                                   SubnetAddCommand="add $SUBNET $PUBLIC_IP",
                                   SubnetRemoveCommand="del $SUBNET"))
    store.put(store.peer(2, data='"peer two"'))
    store.put(store.peer(5, btype="vxlan"))  # not an extension lease: nothing runs for it
    fake = FakeCommands(results={"mkdata": CommandResult("", "my <data>")})
    d, task, kernel = await start_daemon(tmp_path, store, fake)
    try:
        own = store.leases["10.244.1.0-24"]
        assert own.attrs.backend_type == "extension"
        assert own.attrs.backend_data == '"my \\u003cdata\\u003e"'
        post = fake.of("post")
        assert len(post) == 1 and {k: post[0].env[k] for k in (
            "NETWORK", "SUBNET", "IPV6SUBNET", "PUBLIC_IP", "PUBLIC_IPV6")} == {
            "NETWORK": "10.244.0.0/16", "SUBNET": "10.244.1.0/24", "IPV6SUBNET": "::/0",
            "PUBLIC_IP": str(own.attrs.public_ip), "PUBLIC_IPV6": "<nil>"}
        await until(lambda: len(fake.of("add")) == 1, "peer 2's add command")
        add = fake.of("add")[0]
        assert add.words == ("add", "$SUBNET", "$PUBLIC_IP") and add.stdin == "peer two"
        assert add.env == {"SUBNET": "10.244.2.0/24", "PUBLIC_IP": "192.168.77.2"}
        store.put(store.peer(3))
        await until(lambda: len(fake.of("add")) == 2, "peer 3's add command")
        store.delete("10.244.2.0-24")
        await until(lambda: len(fake.of("del")) == 1, "peer 2's remove command")
        assert fake.of("del")[0].env["SUBNET"] == "10.244.2.0/24"
        assert not kernel.routes  # the commands own the data path, we program nothing
        env = read_subnet_env(tmp_path / "subnet.env")
        assert env is not None and env.mtu == kernel.interface().mtu
    finally:
        await stop(d, task)


async def test_a_failing_pre_startup_command_stops_the_daemon(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = InMemoryStore(ext_conf(PreStartupCommand="mkdata"))
    fake = FakeCommands(results={"mkdata": CommandResult("exit status 1", "no key")})
    _d, task, _k = await start_daemon(tmp_path, store, fake)
    assert await asyncio.wait_for(task, 5) == EXIT_ERROR
    assert ("Error registering network: failed to run command: mkdata Err: exit status 1 "
            "Output: no key") in caplog.text


class NoPeersStore(InMemoryStore):
    """A store whose peers must never be asked for (alloc)."""

    asked = False

    async def updates(self) -> AsyncIterator[LeaseUpdate]:
        self.asked = True
        raise AssertionError("alloc asked for peers")
        yield  # pragma: no cover


async def test_daemon_with_alloc_gets_a_lease_and_watches_no_peers(tmp_path: Path) -> None:
    store = NoPeersStore('{"Network":"10.244.0.0/16","Backend":{"Type":"alloc"}}')
    store.put(store.peer(2))
    d, task, kernel = await start_daemon(tmp_path, store, FakeCommands())
    try:
        await asyncio.sleep(0.05)
        assert not task.done() and not store.asked
        own = store.leases["10.244.1.0-24"]
        assert own.attrs.to_json() == f'{{"PublicIP":"{own.attrs.public_ip}","PublicIPv6":null}}'
        env = read_subnet_env(tmp_path / "subnet.env")
        assert env is not None and env.mtu == kernel.interface().mtu
        assert not kernel.routes
    finally:
        await stop(d, task)


@pytest.mark.parametrize("btype", sorted(REFUSED))
async def test_refused_types_fail_with_one_line_naming_the_field(
        tmp_path: Path, btype: str, caplog: pytest.LogCaptureFixture) -> None:
    store = InMemoryStore(json.dumps({"Network": "10.244.0.0/16", "Backend": {"Type": btype}}))
    _d, task, _k = await start_daemon(tmp_path, store, FakeCommands())
    assert await asyncio.wait_for(task, 5) == EXIT_ERROR
    msg = unknown_backend_message(btype)
    assert msg.startswith(f"Backend.Type: '{btype}' is not supported by pyflannel: ")
    assert "\n" not in msg and msg in caplog.text


def test_unknown_type_message_lists_what_exists() -> None:
    assert unknown_backend_message("nope") == (
        "Backend.Type: unknown backend type: nope (this version of pyflannel supports "
        "host-gw, vxlan, wireguard, extension, alloc)")
