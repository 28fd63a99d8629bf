"""flanneld configuration: command line flags, `FLANNELD_*` environment, net-conf.json."""

from pyflannel.config.flags import (
    FLAG_SPECS,
    ConfigError,
    Flags,
    FlagSpec,
    HelpRequested,
    help_text,
    parse_flags,
)
from pyflannel.config.netconf import (
    NetConf,
    NetConfError,
    VxlanOptions,
    check_network_config,
    parse_netconf,
    vxlan_options,
)

__all__ = [
    "FLAG_SPECS",
    "ConfigError",
    "FlagSpec",
    "Flags",
    "HelpRequested",
    "NetConf",
    "NetConfError",
    "VxlanOptions",
    "check_network_config",
    "help_text",
    "parse_flags",
    "parse_netconf",
    "vxlan_options",
]
