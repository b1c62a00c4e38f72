"""The native provider: overlayfs + OCI runtime (crun, runc, runsc) + cgroup v1 + netns."""

from stacyvm_server.providers.native.provider import NativeProvider

__all__ = ["NativeProvider"]
