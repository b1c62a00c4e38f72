"""Config precedence: environment > YAML > defaults; bad values are refused by name."""

from pathlib import Path

import pytest

from stacyvm_server.config import load_settings


def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("STACYVM_CONFIG", raising=False)
    s = load_settings()
    assert s.server.port == 7423
    assert s.defaults.ttl == "30m"
    assert s.defaults.max_ttl == "24h"
    assert s.defaults.provider == "native"
    assert not s.auth.enabled


def test_yaml_then_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "stacyvm.yaml"
    cfg.write_text("server: {port: 8000, data_dir: /tmp/x}\ndefaults: {max_ttl: 2h, memory_mb: 256}\n")
    monkeypatch.setenv("STACYVM_SERVER_PORT", "9000")
    monkeypatch.setenv("STACYVM_AUTH_API_KEY", "k1")
    s = load_settings(cfg)
    assert s.server.port == 9000  # env wins
    assert s.server.data_dir == Path("/tmp/x")  # yaml kept
    assert s.defaults.max_ttl == "2h"
    assert s.defaults.memory_mb == 256
    assert s.auth.enabled


def test_bad_values_named(tmp_path: Path) -> None:
    cfg = tmp_path / "stacyvm.yaml"
    cfg.write_text("defaults: {max_ttl: forever}\n")
    with pytest.raises(ValueError, match="max_ttl"):
        load_settings(cfg)
    cfg.write_text("nonsense: {}\n")
    with pytest.raises(ValueError, match="nonsense"):
        load_settings(cfg)
    cfg.write_text("server: {prot: 1}\n")
    with pytest.raises(ValueError, match="prot"):
        load_settings(cfg)
