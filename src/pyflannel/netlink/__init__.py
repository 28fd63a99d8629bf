"""A small stdlib-only rtnetlink client for flannel's hot paths.

Bulk route/neighbour/FDB programming, dumps and event monitoring go through here (pyroute2
costs ~0.5 ms per request; this costs a few microseconds). Link and address creation stay
with pyroute2.
"""

from pyflannel.netlink.codec import (
    AF_BRIDGE,
    FDB_STATE,
    NTF_SELF,
    NUD_NOARP,
    NUD_PERMANENT,
    NUD_REACHABLE,
    NUD_STALE,
    RT_SCOPE_LINK,
    RT_SCOPE_UNIVERSE,
    RT_TABLE_MAIN,
    RTN_BLACKHOLE,
    RTN_UNICAST,
    RTPROT_BOOT,
    RTPROT_KERNEL,
    FdbEntry,
    LinkEvent,
    Neighbour,
    NetlinkDecodeError,
    NetlinkError,
    Op,
    OpResult,
    Route,
    RtEvent,
)
from pyflannel.netlink.rtnl import DumpInterrupted, RtMonitor, RtNetlink, dump_consistently

__all__ = [
    "AF_BRIDGE",
    "FDB_STATE",
    "NTF_SELF",
    "NUD_NOARP",
    "NUD_PERMANENT",
    "NUD_REACHABLE",
    "NUD_STALE",
    "RTN_BLACKHOLE",
    "RTN_UNICAST",
    "RTPROT_BOOT",
    "RTPROT_KERNEL",
    "RT_SCOPE_LINK",
    "RT_SCOPE_UNIVERSE",
    "RT_TABLE_MAIN",
    "DumpInterrupted",
    "FdbEntry",
    "LinkEvent",
    "Neighbour",
    "NetlinkDecodeError",
    "NetlinkError",
    "Op",
    "OpResult",
    "Route",
    "RtEvent",
    "RtMonitor",
    "RtNetlink",
    "dump_consistently",
]
