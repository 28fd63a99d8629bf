"""Runs one WgPort call inside a namespace (`ip netns exec NS python -m tests.kernel.wg_driver
…`) and prints the result as JSON: the kernel test drives the real UserspaceWgPort this way,
each call from a fresh process, as a restarted flanneld would."""

from __future__ import annotations

import asyncio
import json
import sys
from ipaddress import ip_address, ip_network

from pyflannel.kernel.ports import WgError
from pyflannel.kernel.wireguard import AutoWgPort, UserspaceWgPort
from pyflannel.reconcile.plan import WgDevice, WgPeer


async def main(argv: list[str]) -> dict[str, object]:
    port = UserspaceWgPort()
    cmd, name = argv[0], argv[1]
    if cmd == "ensure":
        index = await port.ensure(WgDevice(name, argv[2], int(argv[3]), 1420))
        started, adopted = port.ownership(name)
        return {"index": index, "started": started, "adopted": adopted,
                "impl": port.implementation}
    if cmd == "ensure-auto":  # argv[4]: auto, kernel or userspace
        auto = AutoWgPort(argv[4])
        try:
            index = await auto.ensure(WgDevice(name, argv[2], int(argv[3]), 1420))
        except WgError as e:
            return {"error": str(e)}
        return {"index": index, "impl": auto.implementation}
    if cmd == "update":
        spec = json.loads(argv[2])
        peers = [WgPeer(name, p["key"], (ip_address(p["ip"]), p["port"]),
                        frozenset(ip_network(n) for n in p["ips"]), p.get("psk"),
                        p.get("keepalive", 0)) for p in spec.get("put", [])]
        await port.update(name, put=peers, remove=spec.get("remove", []))
        return {}
    st = await port.state(name)
    if st is None:
        return {"state": None}
    return {"public_key": st.public_key, "listen_port": st.listen_port, "peers": {
        k: {"endpoint": f"{p.endpoint[0]}:{p.endpoint[1]}" if p.endpoint else None,
            "ips": sorted(str(n) for n in p.allowed_ips), "psk": p.preshared_key,
            "keepalive": p.keepalive} for k, p in st.peers.items()}}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1:]))))
