"""The default seccomp profile: allow by default, refuse the dangerous syscalls.

A deny-list (rather than Docker's allow-list) keeps arbitrary images working
while closing the kernel surfaces that matter for a multi-tenant host. Refused
calls fail with EPERM so programs see an ordinary permission error.
"""

from __future__ import annotations

from typing import Any

EPERM = 1
ENOSYS = 38
CLONE_NEWUSER = 0x10000000

# Each group says why it is refused.
_DENY: dict[str, tuple[str, ...]] = {
    # Kernel keyrings are not namespaced: keys of other tenants/host could leak.
    "keyring": ("add_key", "keyctl", "request_key"),
    # eBPF and perf are large attack surfaces and expose host-wide data.
    "bpf_perf": ("bpf", "perf_event_open"),
    # No mounts or root switching inside the sandbox (old and new mount API).
    "mount": (
        "mount", "umount", "umount2", "pivot_root", "fsopen", "fsconfig", "fsmount",
        "fspick", "move_mount", "open_tree", "mount_setattr",
    ),
    # Kernel image and modules.
    "kernel": (
        "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
        "create_module", "get_kernel_syms", "query_module",
    ),
    # Host-wide machine state.
    "host": (
        "reboot", "swapon", "swapoff", "acct", "settimeofday", "clock_settime", "clock_adjtime",
        "adjtimex", "stime", "syslog", "quotactl", "nfsservctl", "lookup_dcookie", "vhangup",
    ),
    # File handles bypass path-based confinement (the "shocker" breakout).
    "handles": ("open_by_handle_at", "name_to_handle_at"),
    # Frequent exploitation primitives with little legitimate use in a sandbox.
    "primitives": ("userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register"),
    # Raw port I/O and legacy modes.
    "legacy": ("iopl", "ioperm", "vm86", "vm86old", "uselib"),
    # Joining other namespaces (needs caps we drop; belt and braces).
    "setns": ("setns",),
}


def default_profile() -> dict[str, Any]:
    deny = sorted({name for group in _DENY.values() for name in group})
    rules: list[dict[str, Any]] = [
        {"names": deny, "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM},
        # Nested user namespaces give an unprivileged process a full set of
        # capabilities over new namespaces, the entry point of many kernel bugs.
        {
            "names": ["unshare", "clone"],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": EPERM,
            "args": [{"index": 0, "value": CLONE_NEWUSER, "valueTwo": CLONE_NEWUSER, "op": "SCMP_CMP_MASKED_EQ"}],
        },
        # clone3 passes its flags in memory that seccomp cannot inspect, so the
        # CLONE_NEWUSER check above would be bypassable. ENOSYS makes libc fall
        # back to clone(2), which we can filter.
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS},
    ]
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": rules,
    }
