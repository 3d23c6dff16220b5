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
        ({}, "[defaults]\nfail_max = 0\n", "defaults.fail_max"),
        ({}, "[providers.lmstudio]\nfail_max = 0\n", "providers.lmstudio.fail_max"),
        ({}, "[defaults]\nfirst_token_timeout = -1\n", "defaults.first_token_timeout"),
        ({}, "[providers.lmstudio]\ntimeout = 3\n", "providers.lmstudio.timeout"),
        ({}, "[providers.x]\nmodel = 'm'\n", "providers.x.base_url"),
        ({}, "[gateway]\nport = 70000\n", "gateway.port"),
        ({"GATEWAY_PORT": "70000"}, "", "GATEWAY_PORT"),
        ({"GATEWAY_REQUEST_TIMEOUT": "0"}, "", "GATEWAY_REQUEST_TIMEOUT"),
        ({}, "[gateway]\nrequest_timeout = 0\n", "gateway.request_timeout"),
        ({"GATEWAY_MAX_BODY_BYTES": "10"}, "", "GATEWAY_MAX_BODY_BYTES"),
        ({}, "[gateway]\nfailover_order = ['openai', 'bogus']\n", "gateway.failover_order"),
        ({"GATEWAY_API_KEYS_FILE": "/nonexistent/keys"}, "", "GATEWAY_API_KEYS_FILE"),
        ({}, "[gateway]\napi_keys_file = '/nonexistent/keys'\n", "gateway.api_keys_file"),
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


# --------------------------------------------------------------------------- numbers that make no sense
# nan and inf parse as floats (TOML has them as literals), and every comparison with nan is
# false, so a nan timeout would slip past "must be positive" and mean "wait forever".


@pytest.mark.parametrize(
    ("env", "toml", "key"),
    [
        ({"GATEWAY_REQUEST_TIMEOUT": "nan"}, "", "GATEWAY_REQUEST_TIMEOUT"),
        ({"GATEWAY_REQUEST_TIMEOUT": "inf"}, "", "GATEWAY_REQUEST_TIMEOUT"),
        ({"GATEWAY_SHUTDOWN_GRACE": "nan"}, "", "GATEWAY_SHUTDOWN_GRACE"),
        ({"GATEWAY_MAX_BODY_BYTES": "inf"}, "", "GATEWAY_MAX_BODY_BYTES"),
        ({}, "[gateway]\nrequest_timeout = nan\n", "gateway.request_timeout"),
        ({}, "[gateway]\nmax_request_timeout = inf\n", "gateway.max_request_timeout"),
        ({}, "[gateway]\nshutdown_grace = inf\n", "gateway.shutdown_grace"),
        ({}, "[gateway]\nmax_event_bytes = inf\n", "gateway.max_event_bytes"),
        ({}, "[defaults]\nfirst_token_timeout = nan\n", "defaults.first_token_timeout"),
        ({}, "[defaults]\nbackoff_base = inf\n", "defaults.backoff_base"),
        ({}, "[providers.lmstudio]\nprobe_interval = nan\n", "providers.lmstudio.probe_interval"),
        ({}, "[providers.lmstudio]\nmax_queue_wait = -inf\n", "providers.lmstudio.max_queue_wait"),
        ({}, "[providers.ollama]\nfail_max = inf\n", "providers.ollama.fail_max"),
    ],
)
def test_nan_and_inf_are_rejected(tmp_path, env, toml, key):
    cfg = tmp_path / "gw.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_settings({**SEED, "GATEWAY_CONFIG": str(cfg), **env})
    assert info.value.key == key
    assert "finite" in str(info.value)


@pytest.mark.parametrize(
    ("env", "toml", "key", "problem"),
    [
        # aiohttp and asyncio read a 0 timeout as "no timeout": a probe could hang forever.
        ({}, "[defaults]\nprobe_timeout = 0\n", "defaults.probe_timeout", "must be positive"),
        (
            {},
            "[providers.ollama]\nprobe_timeout = 0\n",
            "providers.ollama.probe_timeout",
            "must be positive",
        ),
        # No upstream event fits in 0 bytes: every stream would fail.
        ({}, "[gateway]\nmax_event_bytes = 0\n", "gateway.max_event_bytes", "at least 1024"),
        (
            {},
            "[gateway]\nmax_request_timeout = 0\n",
            "gateway.max_request_timeout",
            "must be positive",
        ),
        # The longest deadline a client may ask for cannot be shorter than the default one.
        (
            {},
            "[gateway]\nrequest_timeout = 120\nmax_request_timeout = 60\n",
            "gateway.max_request_timeout",
            "must be at least request_timeout (120)",
        ),
        (
            {"GATEWAY_REQUEST_TIMEOUT": "900"},
            "",
            "GATEWAY_REQUEST_TIMEOUT",
            "must not exceed max_request_timeout (600)",
        ),
        (
            {"GATEWAY_REQUEST_TIMEOUT": "90"},
            "[gateway]\nmax_request_timeout = 60\n",
            "gateway.max_request_timeout",
            "must be at least request_timeout (90)",
        ),
        ({"GATEWAY_LOG_LEVEL": "verbose"}, "", "GATEWAY_LOG_LEVEL", "must be one of DEBUG"),
        ({}, "[gateway]\nlog_level = 'trace'\n", "gateway.log_level", "must be one of DEBUG"),
    ],
)
def test_settings_that_cannot_work_are_rejected(tmp_path, env, toml, key, problem):
    cfg = tmp_path / "gw.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_settings({**SEED, "GATEWAY_CONFIG": str(cfg), **env})
    assert info.value.key == key
    assert problem in str(info.value)


def test_log_level_any_case_and_good_limits_are_accepted(tmp_path):
    cfg = tmp_path / "gw.toml"
    cfg.write_text("[gateway]\nrequest_timeout = 600\nmax_request_timeout = 600\n")
    s = load_settings({**SEED, "GATEWAY_CONFIG": str(cfg), "GATEWAY_LOG_LEVEL": "debug"})
    assert s.log_level == "DEBUG"
    assert s.request_timeout == s.max_request_timeout == 600
    assert load_settings({**SEED, "GATEWAY_MAX_BODY_BYTES": "2e6"}).max_body_bytes == 2_000_000


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
    for var in (
        "GATEWAY_CLIENT_HEADER_TIMEOUT",
        "GATEWAY_KEEPALIVE_TIMEOUT",
        "GATEWAY_MAX_CLIENT_CONNECTIONS",
    ):
        with pytest.raises(ConfigError) as info:
            load_settings({**SEED, var: "0"})
        assert info.value.key == var  # the variable the user set
