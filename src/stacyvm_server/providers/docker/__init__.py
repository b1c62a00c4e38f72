"""The docker provider: sandboxes as containers through the Docker Engine API."""

from stacyvm_server.providers.docker.provider import DockerProvider

__all__ = ["DockerProvider"]
