"""Our nftables table: `table inet stacyvm`, the only firewall state we own.

Design (routed veths, see network.py): every sandbox's host-side interface is
named `svh<hash>`. Rules match on that name prefix, so a new interface is
covered the instant it exists, with no window before per-sandbox state lands.
Per sandbox we add one element, `ifname . address`, to the `bindings` set: it
is the anti-spoofing check (a sandbox may only send from its own address) and
the list of live sandboxes.
"""

from __future__ import annotations

import ipaddress

from stacyvm_server.util.proc import run

TABLE = "stacyvm"
IF_PREFIX = "svh"


def ruleset(subnet: str, allow_inter_sandbox: bool) -> str:
    """Idempotent: creates what is missing, rewrites our chains, keeps set elements."""
    net = ipaddress.ip_network(subnet)
    sbx = f'iifname "{IF_PREFIX}*"'
    to_sbx = f'oifname "{IF_PREFIX}*"'
    inter = "accept" if allow_inter_sandbox else "drop"
    return f"""
add table inet {TABLE}
add set inet {TABLE} bindings {{ type ifname . ipv4_addr; }}
add chain inet {TABLE} input {{ type filter hook input priority -10; policy accept; }}
add chain inet {TABLE} forward {{ type filter hook forward priority -10; policy accept; }}
add chain inet {TABLE} postrouting {{ type nat hook postrouting priority 100; policy accept; }}
flush chain inet {TABLE} input
flush chain inet {TABLE} forward
flush chain inet {TABLE} postrouting
add rule inet {TABLE} input {sbx} ct state established,related accept
add rule inet {TABLE} input {sbx} counter drop comment "sandboxes never reach host addresses"
add rule inet {TABLE} forward {sbx} meta nfproto ipv6 drop comment "no IPv6 egress"
add rule inet {TABLE} forward {sbx} iifname . ip saddr != @bindings counter drop comment "anti-spoofing"
add rule inet {TABLE} forward {to_sbx} ct state established,related accept
add rule inet {TABLE} forward {sbx} ip daddr 169.254.0.0/16 drop comment "link-local and metadata"
add rule inet {TABLE} forward {sbx} {to_sbx} {inter} comment "sandbox to sandbox"
add rule inet {TABLE} forward {sbx} ip daddr {net} drop
add rule inet {TABLE} forward {to_sbx} drop comment "no unsolicited inbound"
add rule inet {TABLE} forward {sbx} accept
add rule inet {TABLE} postrouting ip saddr {net} oifname != "{IF_PREFIX}*" masquerade
"""


async def ensure_table(subnet: str, allow_inter_sandbox: bool) -> None:
    await run("nft", "-f", "-", input=ruleset(subnet, allow_inter_sandbox).encode(), timeout=10)


async def table_exists() -> bool:
    res = await run("nft", "list", "table", "inet", TABLE, check=False, timeout=10)
    return res.returncode == 0


async def add_binding(ifname: str, addr: str) -> None:
    await run("nft", "add", "element", "inet", TABLE, "bindings", f"{{ {ifname} . {addr} }}", timeout=10)


async def remove_binding(ifname: str, addr: str) -> None:
    # `destroy` would be idempotent but needs nft >= 1.0.8; ignore "missing".
    await run("nft", "delete", "element", "inet", TABLE, "bindings", f"{{ {ifname} . {addr} }}",
              check=False, timeout=10)


async def list_bindings() -> list[tuple[str, str]]:
    res = await run("nft", "-j", "list", "set", "inet", TABLE, "bindings", check=False, timeout=10)
    if res.returncode != 0:
        return []
    import json

    out: list[tuple[str, str]] = []
    for item in json.loads(res.stdout).get("nftables", []):
        for elem in item.get("set", {}).get("elem", []) or []:
            concat = elem.get("concat") if isinstance(elem, dict) else None
            if concat and len(concat) == 2:
                out.append((str(concat[0]), str(concat[1])))
    return out
