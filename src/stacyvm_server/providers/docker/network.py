"""Our bridge network and the one firewall rule set we own for it.

Network "bridge" sandboxes join a user-defined Docker bridge network of ours
(`docker.network`, interface `docker.bridge_name`). Docker itself keeps
sandboxes apart on it (`enable_icc=false`: a DROP for bridge-to-bridge traffic)
and masquerades egress. What Docker does not do is keep containers away from
the host: every host address (the API port included) answers on the bridge's
gateway. `table inet stacyvm_docker` drops everything that enters the host
from our bridge, except replies to connections the host opened.
"""

from __future__ import annotations

import logging

from stacyvm_server.config import DockerConfig
from stacyvm_server.providers.docker.client import DockerAPIError, DockerClient
from stacyvm_server.util.proc import run

log = logging.getLogger(__name__)

TABLE = "stacyvm_docker"
ICC = "com.docker.network.bridge.enable_icc"
BRIDGE_NAME = "com.docker.network.bridge.name"


def ruleset(bridge: str) -> str:
    br = f'iifname "{bridge}"'
    return f"""
add table inet {TABLE}
add chain inet {TABLE} input {{ type filter hook input priority -10; policy accept; }}
add chain inet {TABLE} forward {{ type filter hook forward priority -10; policy accept; }}
flush chain inet {TABLE} input
flush chain inet {TABLE} forward
add rule inet {TABLE} input {br} ct state established,related accept
add rule inet {TABLE} input {br} counter drop comment "sandboxes never reach host addresses"
add rule inet {TABLE} forward {br} meta nfproto ipv6 drop comment "no IPv6 egress"
add rule inet {TABLE} forward {br} ip daddr 169.254.0.0/16 drop comment "link-local and metadata"
"""


async def ensure_firewall(bridge: str) -> None:
    await run("nft", "-f", "-", input=ruleset(bridge).encode(), timeout=10)


async def ensure_network(client: DockerClient, cfg: DockerConfig) -> str:
    """Create our bridge network when missing; warn when an existing one differs from config.

    Returns the host interface name of the bridge (for the firewall)."""
    icc = "true" if cfg.allow_inter_sandbox else "false"
    existing = await client.request("GET", f"/networks/{cfg.network}", ok=(404,))
    if existing is None:
        body = {
            "Name": cfg.network,
            "Driver": "bridge",
            "CheckDuplicate": True,
            "Options": {ICC: icc, BRIDGE_NAME: cfg.bridge_name},
            "IPAM": {"Config": [{"Subnet": cfg.subnet}]},
            "Labels": {"stacyvm.network": "1"},
        }
        try:
            await client.request("POST", "/networks/create", body=body)
            log.info("docker: created network %s (%s, icc=%s)", cfg.network, cfg.subnet, icc)
            return cfg.bridge_name
        except DockerAPIError as exc:
            if exc.http_status != 409:  # another server created it meanwhile
                raise
        existing = await client.request("GET", f"/networks/{cfg.network}")
    opts = existing.get("Options") or {}
    if opts.get(ICC, "true") != icc or opts.get(BRIDGE_NAME) != cfg.bridge_name:
        log.warning("docker: network %s has %s=%s %s=%s, config wants %s and %s; remove the network "
                    "(no sandboxes attached) to recreate it", cfg.network, ICC, opts.get(ICC), BRIDGE_NAME,
                    opts.get(BRIDGE_NAME), icc, cfg.bridge_name)
    return str(opts.get(BRIDGE_NAME) or f"br-{existing['Id'][:12]}")
