"""Configuration: the seed's environment variables, TOML, overrides and clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gateway.config import ConfigError, load_settings

SEED = {
    "OPENAI_API_KEY": "sk-test",
    "LMSTUDIO_MODEL": "qwen2.5-7b-instruct",
    "OLLAMA_MODEL": "llama3.1",
}


def names(settings):
    return [p.name for p in settings.providers]


def test_seed_defaults():
    s = load_settings(SEED)
    assert names(s) == ["openai", "lmstudio", "ollama"]
    openai, lms, ollama = s.providers
    assert openai.base_url == "https://api.openai.com/v1"
    assert openai.model is None and openai.api_key == "sk-test"
    assert lms.base_url == "http://localhost:1234/v1" and lms.model == "qwen2.5-7b-instruct"
    assert ollama.base_url == "http://localhost:11434/v1" and ollama.model == "llama3.1"
    assert s.host == "0.0.0.0" and s.port == 8080
    assert "sk-test" not in repr(openai)  # keys stay out of reprs and logs


def test_lmstudio_model_default():
    assert load_settings({"OPENAI_API_KEY": "k"}).provider("lmstudio").model == "local-model"


@pytest.mark.parametrize(
    "url", ["http://box:1234", "http://box:1234/", "http://box:1234/v1", "http://box:1234/v1/"]
)
def test_base_url_with_or_without_v1(url):
    assert (
        load_settings({**SEED, "LMSTUDIO_BASE_URL": url}).provider("lmstudio").base_url
        == "http://box:1234/v1"
    )


def test_empty_base_url_disables():
    s = load_settings({**SEED, "OLLAMA_BASE_URL": ""})
    assert names(s) == ["openai", "lmstudio"]


def test_openai_without_key_is_skipped():
    s = load_settings({"LMSTUDIO_MODEL": "m"})
    assert names(s) == ["lmstudio", "ollama"]
    # a keyless OpenAI-compatible server elsewhere is kept
    s = load_settings({"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"})
    assert names(s)[0] == "openai"


def test_failover_order():
    s = load_settings({**SEED, "FAILOVER_ORDER": "lmstudio, openai"})
    assert names(s) == ["lmstudio", "openai"]


def test_toml_and_env_override(tmp_path):
    cfg = tmp_path / "gw.toml"
    cfg.write_text(
        """
[gateway]
port = 9000
request_timeout = 60
failover_order = ["groq", "lmstudio"]

[defaults]
first_token_timeout = 12
fail_max = 3

[providers.lmstudio]
base_url = "http://lms:1234"
probe_interval = 2.5

[providers.groq]
base_url = "https://api.groq.com/openai/v1"
api_key_env = "GROQ_KEY"
model = "llama-3.1-8b-instant"
display_name = "Groq"

[aliases]
fast = "groq/llama-3.1-8b-instant"
"""
    )
    s = load_settings(
        {"GATEWAY_CONFIG": str(cfg), "GROQ_KEY": "gsk", "LMSTUDIO_BASE_URL": "http://env:1"}
    )
    assert names(s) == ["groq", "lmstudio"]
    groq, lms = s.providers
    assert groq.api_key == "gsk" and groq.display_name == "Groq" and groq.fail_max == 3
    assert lms.base_url == "http://env:1/v1"  # the environment wins over the file
    assert lms.probe_interval == 2.5 and lms.first_token_timeout == 12
    assert s.port == 9000 and s.request_timeout == 60
    assert s.aliases == {"fast": "groq/llama-3.1-8b-instant"}


@pytest.mark.parametrize(
    ("env", "toml", "key"),
    [
        ({"FAILOVER_ORDER": "openai,bogus"}, "", "FAILOVER_ORDER"),
        ({"LMSTUDIO_BASE_URL": "localhost:1234"}, "", "LMSTUDIO_BASE_URL"),
        ({"GATEWAY_PORT": "eighty"}, "", "GATEWAY_PORT"),
        ({}, "[defaults]\nfail_max = 0\n", "providers.openai.fail_max"),
        ({}, "[defaults]\nfirst_token_timeout = -1\n", "defaults.first_token_timeout"),
        ({}, "[providers.lmstudio]\ntimeout = 3\n", "providers.lmstudio.timeout"),
        ({}, "[providers.x]\nmodel = 'm'\n", "providers.x.base_url"),
        ({}, "[gateway]\nport = 70000\n", "port"),
        ({}, "[aliases]\nfast = 3\n", "aliases.fast"),
        ({}, "not toml [", "GATEWAY_CONFIG"),
    ],
)
def test_bad_values_name_the_key(tmp_path, env, toml, key):
    cfg = tmp_path / "gw.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_settings({**SEED, "GATEWAY_CONFIG": str(cfg), **env})
    assert info.value.key == key
    assert str(info.value).startswith(key)


def test_cli_bad_config_is_one_clear_line(tmp_path):
    env = {
        "PATH": "/usr/bin:/bin",
        "FAILOVER_ORDER": "openai,nope",
        "OPENAI_API_KEY": "sk-secret-value",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "gateway"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        "gateway: configuration error: FAILOVER_ORDER: unknown provider 'nope' (known: openai, lmstudio, ollama)"
    ]
    assert "sk-secret-value" not in proc.stderr + proc.stdout


@pytest.mark.parametrize(
    ("env", "toml", "key"),
    [
        ({"GATEWAY_REQUEST_TIMEOUT": "inf"}, "", "GATEWAY_REQUEST_TIMEOUT"),
        ({"GATEWAY_SHUTDOWN_GRACE": "nan"}, "", "GATEWAY_SHUTDOWN_GRACE"),
        ({}, "[defaults]\nquota_reset_timeout = inf\n", "defaults.quota_reset_timeout"),
        ({}, "[providers.lmstudio]\nreset_timeout = nan\n", "providers.lmstudio.reset_timeout"),
    ],
)
def test_numbers_must_be_finite(tmp_path, env, toml, key):
    """inf and nan pass a `< 0` check; an open breaker for inf seconds has no reopen time."""
    cfg = tmp_path / "gw.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_settings({**SEED, "GATEWAY_CONFIG": str(cfg), **env})
    assert info.value.key == key


@pytest.mark.parametrize(
    ("env", "toml", "key"),
    [
        ({"OPENAI_BASE_URL": "http://alice:s3cr3t-pa55@127.0.0.1:9/v1"}, "", "OPENAI_BASE_URL"),
        ({"OLLAMA_BASE_URL": "http://:s3cr3t-pa55@gpu-box:11434"}, "", "OLLAMA_BASE_URL"),
        ({"LMSTUDIO_BASE_URL": "http://s3cr3t-pa55@gpu-box:1234"}, "", "LMSTUDIO_BASE_URL"),
        ({"LMSTUDIO_BASE_URL": "ftp://bob:s3cr3t-pa55@gpu-box"}, "", "LMSTUDIO_BASE_URL"),
        (
            {},
            "[providers.x]\nbase_url = 'https://proxy/v1?api-key=s3cr3t-pa55'\n",
            "providers.x.base_url",
        ),
        ({}, "[providers.x]\nbase_url = 'https://u:s3cr3t-pa55@proxy'\n", "providers.x.base_url"),
    ],
)
def test_base_url_credentials_are_refused_without_echo(tmp_path, env, toml, key):
    """A password in a base URL would show in /admin/providers and the logs, and with an
    API key set aiohttp refuses every request (two sources of Authorization)."""
    cfg = tmp_path / "gw.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_settings({**SEED, "GATEWAY_CONFIG": str(cfg), **env})
    assert info.value.key == key
    assert "s3cr3t-pa55" not in str(info.value)
    assert "\n" not in str(info.value)


def test_cli_base_url_credentials_are_one_line_without_the_password():
    env = {
        "PATH": "/usr/bin:/bin",
        "OPENAI_API_KEY": "sk-secret-value",
        "OPENAI_BASE_URL": "http://alice:s3cr3t-pa55@127.0.0.1:9/v1",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "gateway"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gateway: configuration error: OPENAI_BASE_URL:")
    assert "s3cr3t-pa55" not in proc.stderr + proc.stdout


def test_client_connection_settings():
    s = load_settings(SEED)
    assert (s.client_header_timeout, s.client_body_timeout) == (60, 60)
    assert (s.keepalive_timeout, s.max_client_connections) == (75, 1024)
    s = load_settings(
        {
            **SEED,
            "GATEWAY_CLIENT_HEADER_TIMEOUT": "5",
            "GATEWAY_CLIENT_BODY_TIMEOUT": "7.5",
            "GATEWAY_KEEPALIVE_TIMEOUT": "620",
            "GATEWAY_MAX_CLIENT_CONNECTIONS": "4000",
        }
    )
    assert (s.client_header_timeout, s.client_body_timeout) == (5, 7.5)
    assert (s.keepalive_timeout, s.max_client_connections) == (620, 4000)
    for var, key in (
        ("GATEWAY_CLIENT_HEADER_TIMEOUT", "client_header_timeout"),
        ("GATEWAY_KEEPALIVE_TIMEOUT", "keepalive_timeout"),
        ("GATEWAY_MAX_CLIENT_CONNECTIONS", "max_client_connections"),
    ):
        with pytest.raises(ConfigError) as info:
            load_settings({**SEED, var: "0"})
        assert info.value.key == key
