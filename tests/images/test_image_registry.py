from pathlib import Path

import pytest

from stacyvm_server.config import ImagesConfig, RegistryConfig
from stacyvm_server.images.blobs import BlobStore
from stacyvm_server.images.registry import RegistryClient, is_loopback


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1:5000", True), ("127.9.9.9", True), ("localhost:5000", True), ("[::1]:5000", True),
     ("10.0.0.1:5000", False), ("docker.io", False), ("localhost.example.com", False)],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_endpoints_mirrors_first_and_schemes(tmp_path: Path) -> None:
    cfg = ImagesConfig(registries={
        "docker.io": RegistryConfig(mirrors=["mirror.local:5000", "127.0.0.1:6000"]),
        "mirror.local:5000": RegistryConfig(insecure=True, username="u", password="p"),
        "corp.example:443": RegistryConfig(insecure=True),
    })
    client = RegistryClient(cfg, BlobStore(tmp_path))
    eps = client.endpoints("docker.io")
    assert [e.base for e in eps] == [
        "http://mirror.local:5000", "http://127.0.0.1:6000", "https://registry-1.docker.io"]
    assert eps[0].creds.username == "u" and eps[2].creds.username is None
    assert client.endpoints("corp.example:443")[0].base == "http://corp.example:443"
    assert client.endpoints("ghcr.io")[0].base == "https://ghcr.io"
