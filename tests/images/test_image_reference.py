import pytest

from stacyvm_server.errors import ImageError
from stacyvm_server.images.reference import parse_reference

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("alpine", "docker.io/library/alpine:latest"),
        ("alpine:3.19", "docker.io/library/alpine:3.19"),
        ("user/x:tag", "docker.io/user/x:tag"),
        ("docker.io/alpine", "docker.io/library/alpine:latest"),
        ("index.docker.io/library/alpine:1", "docker.io/library/alpine:1"),
        ("ghcr.io/org/team/tool:v1.2.3", "ghcr.io/org/team/tool:v1.2.3"),
        ("127.0.0.1:5000/stacyvm/busybox:1.35", "127.0.0.1:5000/stacyvm/busybox:1.35"),
        ("localhost:5000/x", "localhost:5000/x:latest"),
        ("localhost/x", "localhost/x:latest"),
        ("[::1]:5000/x:t", "[::1]:5000/x:t"),
        (f"alpine@{DIGEST}", f"docker.io/library/alpine@{DIGEST}"),
        (f"alpine:3.19@{DIGEST}", f"docker.io/library/alpine:3.19@{DIGEST}"),
        ("a.b/c_d__e-f.g:T_a.g-1", "a.b/c_d__e-f.g:T_a.g-1"),
    ],
)
def test_parse_normalises(text: str, expected: str) -> None:
    assert str(parse_reference(text)) == expected


def test_parts() -> None:
    r = parse_reference(f"127.0.0.1:5000/a/b:t@{DIGEST}")
    assert (r.registry, r.repository, r.tag, r.digest) == ("127.0.0.1:5000", "a/b", "t", DIGEST)
    assert r.selector == DIGEST  # the digest wins when both are given


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "empty"),
        (" alpine", "whitespace"),
        ("Alpine", "lowercase"),
        ("alpine:", "bad tag"),
        ("alpine:-x", "bad tag"),
        ("alpine:" + "t" * 129, "bad tag"),
        ("alpine@sha256:abc", "digest"),
        ("alpine@md5:" + "a" * 32, "digest"),
        ("a//b", "repository component"),
        ("a/b/", "repository component"),
        ("-a", "repository component"),
        ("a b", "repository component"),
        ("bad_host.:5000/x", "registry host"),
        ("x/" + "a" * 300, "longer than"),
    ],
)
def test_rejects_junk(text: str, problem: str) -> None:
    with pytest.raises(ImageError, match=problem):
        parse_reference(text)


def test_aliases_exact_match_before_parsing() -> None:
    aliases = {"stacyvm/busybox": "127.0.0.1:5000/stacyvm/busybox:1.35"}
    assert str(parse_reference("stacyvm/busybox", aliases=aliases)) == "127.0.0.1:5000/stacyvm/busybox:1.35"
    # Only the exact text is an alias.
    assert str(parse_reference("stacyvm/busybox:1", aliases=aliases)) == "docker.io/stacyvm/busybox:1"


def test_default_registry() -> None:
    r = parse_reference("python:3.11", default_registry="127.0.0.1:5000")
    assert str(r) == "127.0.0.1:5000/python:3.11"  # "library/" is a Docker Hub convention only
