"""The preview acceptance cases through the docker provider (runc): Provider.connect enters the
container's netns (/proc/<State.Pid>/ns/net). The test functions are those of
test_preview_native.py, run here against this module's docker `box` and `make_box`."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator

import pytest

from tests.conftest import ServerProc, destroy_all, start_server, stop_server
from tests.preview.conftest import PreviewBox, box_factory, start_app
from tests.preview.test_preview_native import (  # noqa: F401  (collected here with the docker fixtures)
    test_download_50mb_bounded_memory,
    test_nothing_listening_502,
    test_server_bound_to_loopback,
    test_sse_events_arrive_one_by_one,
    test_static_page_by_host,
    test_token_for_3000_rejected_on_8000,
    test_token_of_another_sandbox_rejected,
    test_upload_50mb_bounded_memory_and_no_body_limit,
    test_websocket_echo,
)
from tests.providers import docker_fixtures
from tests.providers.docker_fixtures import DOCKER_PYTHON

docker_daemon = docker_fixtures.docker_daemon


@pytest.fixture(scope="module")
def docker_server(docker_daemon: None, test_images: dict[str, str],
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    server = start_server(tmp_path_factory.mktemp("preview-docker"),
                          extra={"docker": {"enabled": True, "runtime": "runc"}})
    yield server
    destroy_all(server)
    stop_server(server)
    shutil.rmtree(server.data_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def make_box(docker_server: ServerProc) -> Iterator[Callable[[str], PreviewBox]]:
    yield from box_factory(docker_server, provider="docker", image=DOCKER_PYTHON)


@pytest.fixture(scope="module")
def box(make_box: Callable[[str], PreviewBox]) -> PreviewBox:
    """A docker sandbox (network none) with the app on 8000 (0.0.0.0) and 3000 (127.0.0.1)."""
    b = make_box("none")
    start_app(b, 8000)
    start_app(b, 3000, "127.0.0.1")
    return b
