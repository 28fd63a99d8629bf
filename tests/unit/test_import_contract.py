"""The layering, as a checked contract: every import in src/pyflannel (function-local ones
included) is read with ast and held against the rules below. A new import that climbs the
layers fails here, not in a review."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PRODUCT = SRC / "pyflannel"

# Leaf modules that import only the standard library: anyone may use them.
LEAVES = {"pyflannel.jsonlimits"}


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


MODULES = {module_name(p): imports_of(p) for p in sorted(PRODUCT.rglob("*.py"))}


def ours(imported: set[str]) -> set[str]:
    return {i for i in imported if i == "pyflannel" or i.startswith("pyflannel.")}


def under(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def violations(of: str, forbidden: tuple[str, ...] = (), only: tuple[str, ...] = ()) -> list[str]:
    out = []
    for mod, imported in MODULES.items():
        if not under(mod, of):
            continue
        for imp in ours(imported):
            if under(imp, *LEAVES, of):
                continue
            if forbidden and under(imp, *forbidden):
                out.append(f"{mod} imports {imp}")
            if only and not under(imp, *only):
                out.append(f"{mod} imports {imp}")
    return sorted(set(out))


def test_the_contract_sees_the_code() -> None:
    assert len(MODULES) > 50 and "pyflannel.daemon.main" in MODULES
    assert "pyflannel.lease.model" in MODULES["pyflannel.lease.table"]


@pytest.mark.parametrize("package", ["pyflannel.lease", "pyflannel.config"])
def test_the_model_imports_nothing_else_of_ours(package: str) -> None:
    # config.netconf builds on config.flags only; lease on lease only.
    assert violations(package, only=(package,)) == []


def test_stores_do_not_import_backends_the_engine_or_netlink() -> None:
    assert violations("pyflannel.subnet", forbidden=(
        "pyflannel.backend", "pyflannel.reconcile", "pyflannel.netlink", "pyflannel.kernel",
        "pyflannel.dataplane", "pyflannel.daemon", "pyflannel.status")) == []


def test_backends_import_only_the_ports_the_plan_and_the_model() -> None:
    # pyflannel.netlink (the package) is the ports' vocabulary: Route, Neighbour, ...; its
    # socket and codec modules are not.
    bad = violations("pyflannel.backend", only=(
        "pyflannel.kernel.ports", "pyflannel.reconcile.plan", "pyflannel.reconcile.hooks",
        "pyflannel.netlink", "pyflannel.lease", "pyflannel.config", "pyflannel.iface.select",
        # WireGuard keys: stdlib X25519 and the key file, a leaf
        "pyflannel.kernel.wgkeys"))
    bad += [f"{m} imports {i}" for m, imp in MODULES.items() if under(m, "pyflannel.backend")
            for i in ours(imp) if under(i, "pyflannel.netlink.rtnl", "pyflannel.netlink.codec")]
    assert bad == []


def test_the_plan_is_pure() -> None:
    imported = MODULES["pyflannel.reconcile.plan"]
    assert not {"asyncio", "subprocess", "pyflannel.netlink.rtnl", "pyflannel.kernel"} & imported
    assert ours(imported) <= {"pyflannel.netlink", *(f"pyflannel.netlink.{n}" for n in (
        "NUD_PERMANENT", "RTN_BLACKHOLE", "RTN_UNICAST", "FdbEntry", "Neighbour", "Nexthop",
        "Op", "Route"))}


def test_the_hook_plan_is_pure() -> None:
    # What the extension backend's peers run is described here; running is hookrunner's.
    imported = MODULES["pyflannel.reconcile.hooks"]
    assert not {"asyncio", "subprocess", "os"} & imported
    assert ours(imported) == set()


def test_status_never_imports_the_daemon() -> None:
    assert violations("pyflannel.status", forbidden=("pyflannel.daemon",)) == []


def test_the_cni_plugin_is_stdlib_only() -> None:
    imported = MODULES["pyflannel.cni.flannel_plugin"]
    top = {i.split(".")[0] for i in imported}
    assert top <= set(sys.stdlib_module_names), top - set(sys.stdlib_module_names)


def test_the_product_never_imports_the_lab() -> None:
    # `pyflannel lab ...` hands over to pyflannel_lab.cli when that package is installed
    # (a source checkout): the one, lazy, exception the issue allows.
    assert [f"{m} imports {i}" for m, imp in MODULES.items() for i in imp
            if under(i, "pyflannel_lab") and m != "pyflannel.cli"] == []
    assert ours_lab(MODULES["pyflannel.cli"]) == {"pyflannel_lab.cli", "pyflannel_lab.cli.main"}


def ours_lab(imported: set[str]) -> set[str]:
    return {i for i in imported if under(i, "pyflannel_lab")}


def test_the_engine_reaches_the_kernel_only_through_its_port() -> None:
    for mod in ("pyflannel.reconcile.engine", "pyflannel.dataplane"):
        assert not {i for i in MODULES[mod]
                    if under(i, "pyflannel.netlink.rtnl", "pyflannel.kernel.netlink_ports",
                             "pyroute2")}, mod
