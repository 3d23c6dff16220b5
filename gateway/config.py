"""Settings: environment variables over an optional TOML file, validated once at start-up.

The seed's environment variables keep their meaning (``OPENAI_API_KEY``,
``OPENAI_BASE_URL``, ``LMSTUDIO_BASE_URL``, ``LMSTUDIO_MODEL``, ``OLLAMA_BASE_URL``,
``OLLAMA_MODEL``, ``FAILOVER_ORDER``). Everything else lives in the TOML file named by
``GATEWAY_CONFIG``; environment variables win over it. A bad value raises
:class:`ConfigError`, whose message names the key.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from gateway.auth import AccessPolicy, digest
from gateway.providers import DIALECTS
from gateway.quotas import ClientKey, QuotaSettings

#: Provider names the seed knows, in the default failover order.
BUILTIN_PROVIDERS = ("openai", "lmstudio", "ollama")
_DISPLAY_NAMES = {"openai": "OpenAI", "lmstudio": "LM Studio", "ollama": "Ollama"}
_ENV_PREFIX = {"openai": "OPENAI", "lmstudio": "LMSTUDIO", "ollama": "OLLAMA"}
_DEFAULT_BASE_URLS = {
    "openai": "https://api.openai.com/v1",
    "lmstudio": "http://localhost:1234",
    "ollama": "http://localhost:11434",
}
# LM Studio and Ollama serve whatever model is loaded, so they get a fixed upstream name;
# OpenAI receives the client's model unchanged (None).
_DEFAULT_MODELS: dict[str, str | None] = {
    "openai": None,
    "lmstudio": "local-model",
    "ollama": "llama3.2",
}
MiB = 1024 * 1024
#: What ``log_level`` may be (any case); ``WARN`` is logging's alias of ``WARNING``.
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class ConfigError(ValueError):
    """A configuration value is missing or wrong; the message names the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    """One upstream provider: where it is, how to reach it, and how to judge it."""

    name: str
    display_name: str
    base_url: str  # ends in /v1 for the openai and anthropic dialects (see normalize_base_url)
    api_key: str | None = field(default=None, repr=False)
    model: str | None = None  # upstream model; None passes the client's model through
    dialect: str = "openai"  # a key of gateway.providers.DIALECTS
    # Per dialect (gateway/providers/): anthropic's anthropic-version or azure's api-version
    # (None: the dialect's default); the max_tokens Anthropic requires when the client sends
    # none; and the openai dialect's compatibility options for local servers (on by default
    # for lmstudio and ollama when loaded from configuration).
    api_version: str | None = None
    default_max_tokens: int = 4096
    map_max_completion_tokens: bool = False
    dedupe_tool_call_names: bool = False
    connect_timeout: float = 5.0
    first_token_timeout: float = 30.0
    idle_timeout: float = 30.0
    response_timeout: float = 60.0
    max_connections: int = 1000
    fail_max: int = 5
    reset_timeout: float = 30.0
    quota_reset_timeout: float = 300.0
    probe_interval: float = 10.0
    probe_timeout: float = 2.0
    stall_timeout: float = 5.0  # no byte for this long while a client gives up: hung
    max_retries: int = 2
    backoff_base: float = 0.25
    backoff_max: float = 2.0
    max_retry_wait: float = 2.0
    max_concurrency: int = 0  # 0: no limit
    max_queue: int = 100
    max_queue_wait: float = 1.0
    rpm: float = 0.0  # requests per minute (0: none configured; gateway.budgets)
    tpm: float = 0.0  # tokens per minute (0: none configured)
    burst_seconds: float = 1.0  # how many seconds of refill a budget holds (at least 1 request)
    verify_tls: bool = True
    # Streams: after this many seconds without a first token, the same request goes to the
    # next usable provider too (gateway.hedge); "p95": this provider's recent 95th
    # percentile. None: never.
    hedge_after: float | str | None = None


#: How a ``[cache.models]`` rule caches a model's requests: ``deterministic`` only those
#: with ``temperature = 0`` (and embeddings), ``always`` sampled ones too.
CACHE_MODES = ("deterministic", "always")


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """The response cache and request coalescing (``[cache]``; see ``gateway.cache``)."""

    enabled: bool = True  # false: the x-gateway-cache headers and [cache.models] are ignored
    ttl: float = 3600.0  # seconds an entry lives, unless x-gateway-cache-ttl says otherwise
    max_ttl: float = 86400.0  # the longest x-gateway-cache-ttl a client may ask for
    max_entries: int = 10000
    max_bytes: int = 64 * MiB
    max_entry_bytes: int = 4 * MiB  # a larger answer is served, not stored
    shared: bool = False  # with GATEWAY_API_KEYS: one cache for every client key
    coalesce: bool = True  # identical requests in flight share one upstream call
    redis_url: str | None = field(default=None, repr=False)  # may hold a password
    redis_timeout: float = 0.5  # one Redis command, connecting included
    redis_retry: float = 1.0  # after a Redis failure, requests leave it alone this long
    models: Mapping[str, str] = field(default_factory=dict)  # model or alias -> CACHE_MODES


#: How a ``[rescue.models]`` rule rescues a model's streams that fail after their first
#: token (gateway.rescue): ``restart`` the request and verify that it reproduces what the
#: client has, or ``prefill`` the partial answer (a verified restart if it is refused).
RESCUE_MODES = ("restart", "prefill", "off")


@dataclass(frozen=True, slots=True)
class RescueSettings:
    """Rescuing streams cut after commit (``[rescue]``; see ``gateway.rescue``)."""

    max_rescues: int = 1  # restarts per stream
    max_prefix_bytes: int = 1 * MiB  # text a rescue verifies (and holds); more: not rescued
    keepalive: float = 5.0  # seconds between SSE comments while a rescue regenerates
    models: Mapping[str, str] = field(default_factory=dict)  # model or alias -> RESCUE_MODES


@dataclass(frozen=True, slots=True)
class SharingSettings:
    """Provider state and limits shared through Redis (``[sharing]``; see
    ``gateway.sharing``): on when a Redis URL is set, here or for the cache."""

    enabled: bool = True  # false: each process keeps its own state, even with a Redis URL
    redis_url: str | None = field(default=None, repr=False)  # may hold a password
    redis_timeout: float = 0.5  # one Redis command, connecting included
    redis_retry: float = 1.0  # after a Redis failure, it is left alone this long


#: The most worker processes ``workers`` may ask for.
MAX_WORKERS = 256


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the gateway needs to run."""

    providers: tuple[ProviderConfig, ...]  # in failover order, enabled ones only
    aliases: Mapping[str, str] = field(default_factory=dict)
    host: str = "0.0.0.0"
    port: int = 8080
    request_timeout: float = 120.0
    max_request_timeout: float = 600.0
    max_body_bytes: int = 8 * MiB
    max_event_bytes: int = 1 * MiB
    max_held_bytes: int = 4 * MiB  # a stream's events before its first token
    max_response_bytes: int = 32 * MiB  # a non-streaming answer, decompressed
    send_timeout: float = 60.0  # a write to a client that stopped reading (nginx's value)
    max_stream_duration: float = 1800.0  # a committed stream, unless the client set a deadline
    pass_ratelimit_headers: bool = True  # relay upstream x-ratelimit-* headers to clients
    log_level: str = "INFO"
    access_log: bool = False
    shutdown_grace: float = 30.0
    # Client connections (nginx's names and defaults): a request's headers must arrive
    # within client_header_timeout (from the connection's start, or from the first byte of
    # a later request), no read of its body may wait longer than client_body_timeout, an
    # idle keep-alive connection is closed after keepalive_timeout, and no more than
    # max_client_connections are open at once.
    client_header_timeout: float = 60.0
    client_body_timeout: float = 60.0
    keepalive_timeout: float = 75.0
    max_client_connections: int = 1024
    # Connections the kernel may queue before the gateway accepts them: a burst of new
    # clients larger than aiohttp's 128 would overflow it and wait for SYN retransmits.
    backlog: int = 1024
    access: AccessPolicy = field(default_factory=AccessPolicy, repr=False)
    quotas: QuotaSettings = field(default_factory=QuotaSettings, repr=False)  # per client key
    cache: CacheSettings = field(default_factory=CacheSettings)
    rescue: RescueSettings = field(default_factory=RescueSettings)
    sharing: SharingSettings = field(default_factory=SharingSettings)
    workers: int = 1  # processes serving the port (SO_REUSEPORT), under one supervisor

    @property
    def shared_redis(self) -> str | None:
        """The Redis that provider state and limits are shared through, or None."""
        return self.sharing.redis_url if self.sharing.enabled else None

    def provider(self, name: str) -> ProviderConfig:
        """Return the enabled provider called ``name``."""
        for p in self.providers:
            if p.name == name:
                return p
        raise KeyError(name)


# Keys a [defaults] or [providers.NAME] table may set, with their types.
_PROVIDER_FIELDS = {
    f.name: f.type for f in dataclasses.fields(ProviderConfig) if f.name not in ("name",)
}
_CACHE_FIELDS = {f.name: f.type for f in dataclasses.fields(CacheSettings) if f.name != "models"}
_SHARING_FIELDS = {f.name: f.type for f in dataclasses.fields(SharingSettings)}
_RESCUE_FIELDS = {f.name: f.type for f in dataclasses.fields(RescueSettings) if f.name != "models"}
_GATEWAY_FIELDS = {
    "host": "str",
    "port": "int",
    "request_timeout": "float",
    "max_request_timeout": "float",
    "max_body_bytes": "int",
    "max_event_bytes": "int",
    "max_held_bytes": "int",
    "max_response_bytes": "int",
    "send_timeout": "float",
    "max_stream_duration": "float",
    "pass_ratelimit_headers": "bool",
    "log_level": "str",
    "access_log": "bool",
    "shutdown_grace": "float",
    "client_header_timeout": "float",
    "client_body_timeout": "float",
    "keepalive_timeout": "float",
    "max_client_connections": "int",
    "backlog": "int",
    "workers": "workers",
    "admin_loopback_only": "bool",
    "api_keys_file": "str",
    "failover_order": "list",
}
# Provider keys that only some dialects read: set for another, they are a mistake.
_DIALECT_KEYS = {
    "api_version": ("anthropic", "azure"),
    "default_max_tokens": ("anthropic",),
    "map_max_completion_tokens": ("openai", "azure"),
    "dedupe_tool_call_names": ("openai", "azure"),
}
_COMPAT_KEYS = ("map_max_completion_tokens", "dedupe_tool_call_names")
# Built-in providers that are local servers: the compatibility options default to on.
_LOCAL_SERVERS = ("lmstudio", "ollama")
_CLIENT_FIELDS = {"default_rpm": "float", "default_tpm": "float"}
# A client's name in a keys-file line: it becomes a metric label.
_CLIENT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _shown(url: str) -> str:
    """``url`` fit for an error message: user info, query and fragment may hold secrets."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, sep, rest = "", "", url
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        authority = "***@" + authority.rpartition("@")[2]
    path = path.partition("?")[0].partition("#")[0]
    return f"{scheme}{sep}{authority}{slash}{path}"


def normalize_base_url(url: str, key: str, suffix: str = "/v1") -> str:
    """Return ``url`` ending in ``suffix`` (a dialect's API path: ``/v1`` for OpenAI's and
    Anthropic's), without a trailing slash; with no ``suffix``, without a trailing ``/v1``
    (native Ollama's and Azure's paths start at the server's root).

    Credentials in the URL (``http://user:pass@host``) are refused rather than supported:
    the password would show wherever the URL does (``/admin/providers``, logs), and aiohttp
    refuses a request that has both URL credentials and an ``Authorization`` header.
    """
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(key, f"must be an http(s) URL, got {_shown(url)!r}")
    if "@" in parts.netloc:
        raise ConfigError(
            key,
            f"must not contain a user name or password ({_shown(url)!r}); "
            "give the provider's key as its API key instead",
        )
    if parts.query or parts.fragment:
        raise ConfigError(key, f"must not have a query string or fragment ({_shown(url)!r})")
    if not suffix:
        return url.removesuffix("/v1")
    if not url.endswith(suffix):
        url += suffix
    return url


def _coerce(key: str, kind: str, value: Any) -> Any:
    """Check and convert one value from TOML or the environment."""
    if kind in ("float", "int"):
        given = value  # quoted as the user wrote it
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                try:
                    value = float(value)  # also "2e6" for a whole number
                except ValueError:
                    raise ConfigError(key, f"must be a number, got {given!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"must be a number, got {given!r}")
        # nan compares false with everything, so it would slip past every bound below and
        # mean "no limit"; inf means the same openly. Neither is a setting.
        if not math.isfinite(value):
            raise ConfigError(key, f"must be a finite number, got {given!r}")
        if kind == "int" and not float(value).is_integer():
            raise ConfigError(key, f"must be a whole number, got {given!r}")
        if value < 0:
            raise ConfigError(key, f"must not be negative, got {given!r}")
        return float(value) if kind == "float" else int(value)
    if kind == "workers":
        return parse_workers(key, value)
    if kind == "bool":
        if isinstance(value, str):
            low = value.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {value!r}")
        return value
    if kind == "list":
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(key, "must be a list of provider names")
        return value
    if kind in ("str", "str | None"):
        if value is None and kind == "str | None":
            return None
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {value!r}")
        return value
    raise AssertionError(kind)  # a field type this module does not know


def cores() -> int:
    """The CPU cores this process may run on (its affinity: a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def parse_workers(key: str, value: Any) -> int:
    """``workers``: a whole number from 1 to :data:`MAX_WORKERS`, or ``auto`` (the cores)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return cores()
    wanted = f"must be auto or a whole number from 1 to {MAX_WORKERS}, got {value!r}"
    try:
        count = _coerce(key, "int", value)
    except ConfigError:
        raise ConfigError(key, wanted) from None
    if not 1 <= count <= MAX_WORKERS:
        raise ConfigError(key, wanted)
    return int(count)


def _table(data: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(key, "must be a table")
    return value


def _check_keys(table: Mapping[str, Any], allowed: Mapping[str, Any], prefix: str) -> None:
    for k in table:
        if k not in allowed:
            raise ConfigError(f"{prefix}.{k}", "unknown setting")


def _provider_values(table: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    extra = {"api_key_env"}
    _check_keys(table, {**_PROVIDER_FIELDS, **dict.fromkeys(extra)}, prefix)
    values: dict[str, Any] = {}
    for k, v in table.items():
        if k == "api_key_env":
            values["api_key_env"] = _coerce(f"{prefix}.{k}", "str", v)
        elif k == "hedge_after":
            values[k] = _hedge_after(f"{prefix}.{k}", v)
        else:
            values[k] = _coerce(f"{prefix}.{k}", str(_PROVIDER_FIELDS[k]), v)
    return values


def _hedge_after(key: str, value: Any) -> float | str:
    """``hedge_after``: a positive number of seconds, or ``"p95"``."""
    if isinstance(value, str) and value.strip().lower() == "p95":
        return "p95"
    if isinstance(value, str):
        raise ConfigError(key, f'must be a number of seconds or "p95", got {value!r}')
    seconds = _coerce(key, "float", value)
    if seconds <= 0:
        raise ConfigError(key, f"must be positive, got {value!r}")
    return float(seconds)


def load_toml(path: str, key: str = "GATEWAY_CONFIG") -> dict[str, Any]:
    """Read the TOML file at ``path``; a missing or broken file is a ConfigError naming
    ``key``, where the path came from (``GATEWAY_CONFIG`` or ``--config``)."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(key, f"cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(key, f"{path} is not valid TOML: {e}") from None


def _env_overrides(env: Mapping[str, str], name: str) -> dict[str, Any]:
    """The seed's per-provider variables, for the built-in providers."""
    prefix = _ENV_PREFIX.get(name)
    if prefix is None:
        return {}
    out: dict[str, Any] = {}
    for suffix, key in (("BASE_URL", "base_url"), ("MODEL", "model"), ("API_KEY", "api_key")):
        var = f"{prefix}_{suffix}"
        if var in env:
            out[key] = env[var]
    return out


def load_settings(
    env: Mapping[str, str] | None = None, *, config_key: str = "GATEWAY_CONFIG"
) -> Settings:
    """Build :class:`Settings` from ``env`` (default ``os.environ``) and its TOML file.

    ``config_key`` names where the file's path came from, for the error when it cannot be
    read (``--config`` when the command line gave it).
    """
    env = os.environ if env is None else env
    path = env.get("GATEWAY_CONFIG")
    data = load_toml(path, config_key) if path else {}
    tables = (
        "gateway",
        "defaults",
        "providers",
        "aliases",
        "clients",
        "cache",
        "sharing",
        "rescue",
    )
    _check_keys(data, dict.fromkeys(tables), "config")

    gw_table = _table(data, "gateway")
    _check_keys(gw_table, _GATEWAY_FIELDS, "gateway")
    gw = {k: _coerce(f"gateway.{k}", _GATEWAY_FIELDS[k], v) for k, v in gw_table.items()}
    # Where each value came from, so that an error names what the user actually set: the
    # environment variable, else the TOML key.
    origin = {k: f"gateway.{k}" for k in gw}
    for var, key in (
        ("GATEWAY_HOST", "host"),
        ("GATEWAY_PORT", "port"),
        ("GATEWAY_REQUEST_TIMEOUT", "request_timeout"),
        ("GATEWAY_MAX_BODY_BYTES", "max_body_bytes"),
        ("GATEWAY_LOG_LEVEL", "log_level"),
        ("GATEWAY_SHUTDOWN_GRACE", "shutdown_grace"),
        ("GATEWAY_CLIENT_HEADER_TIMEOUT", "client_header_timeout"),
        ("GATEWAY_CLIENT_BODY_TIMEOUT", "client_body_timeout"),
        ("GATEWAY_KEEPALIVE_TIMEOUT", "keepalive_timeout"),
        ("GATEWAY_MAX_CLIENT_CONNECTIONS", "max_client_connections"),
        ("GATEWAY_BACKLOG", "backlog"),
        ("GATEWAY_WORKERS", "workers"),
        ("GATEWAY_ADMIN_LOOPBACK_ONLY", "admin_loopback_only"),
        ("GATEWAY_API_KEYS_FILE", "api_keys_file"),
        ("FAILOVER_ORDER", "failover_order"),
    ):
        if env.get(var):
            gw[key] = _coerce(var, _GATEWAY_FIELDS[key], env[var])
            origin[key] = var
    order = gw.pop("failover_order", None)
    order_key = origin.get("failover_order", "FAILOVER_ORDER")
    gw["access"], client_keys = _access_policy(
        env,
        gw.pop("api_keys_file", None),
        gw.pop("admin_loopback_only", False),
        origin.get("api_keys_file", "api_keys_file"),
    )
    gw["quotas"] = _quotas(_table(data, "clients"), client_keys, bool(gw["access"].client_keys))
    if "log_level" in gw:
        gw["log_level"] = _log_level(gw["log_level"], origin["log_level"])

    defaults = _provider_values(_table(data, "defaults"), "defaults")
    defaults.pop("api_key_env", None)
    for k in ("base_url", "model", "api_key", "display_name"):
        if k in defaults:
            raise ConfigError(f"defaults.{k}", "belongs in a [providers.NAME] table")

    tables = _table(data, "providers")
    names = list(BUILTIN_PROVIDERS) + [n for n in tables if n not in BUILTIN_PROVIDERS]
    if order is None:
        order = names
    for n in order:
        if n not in names:
            known = ", ".join(names)
            raise ConfigError(order_key, f"unknown provider {n!r} (known: {known})")
    if len(set(order)) != len(order):
        raise ConfigError(order_key, "names a provider twice")

    providers = []
    for name in order:
        cfg = _build_provider(name, tables, defaults, env)
        if cfg is not None:
            providers.append(cfg)
    if not providers:
        raise ConfigError(order_key, "no provider is enabled (every base URL is empty)")

    aliases = _table(data, "aliases")
    for k, v in aliases.items():
        if not isinstance(v, str) or not v:
            raise ConfigError(f"aliases.{k}", "must be a model name")

    cache = _cache_settings(_table(data, "cache"), env)
    sharing = _sharing_settings(_table(data, "sharing"), env, cache)
    rescue = _rescue_settings(_table(data, "rescue"))
    settings = Settings(
        providers=tuple(providers),
        aliases=dict(aliases),
        cache=cache,
        sharing=sharing,
        rescue=rescue,
        **gw,
    )
    _check_gateway(settings, origin)
    return settings


def _log_level(value: str, key: str) -> str:
    """``value`` as one of :data:`LOG_LEVELS`: logging itself would raise a bare
    ValueError at start-up for a name it does not know."""
    level = value.strip().upper()
    level = "WARNING" if level == "WARN" else level
    if level not in LOG_LEVELS:
        raise ConfigError(key, f"must be one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return level


def _check_gateway(settings: Settings, origin: Mapping[str, str]) -> None:
    """Bounds between [gateway] values; an error names the value the user set."""

    def key(name: str) -> str:
        return origin.get(name, f"gateway.{name}")

    if not 0 < settings.port < 65536:
        raise ConfigError(key("port"), f"must be 1-65535, got {settings.port}")
    if settings.request_timeout <= 0:
        raise ConfigError(key("request_timeout"), "must be positive")
    if settings.max_request_timeout <= 0:
        raise ConfigError(key("max_request_timeout"), "must be positive")
    if settings.max_request_timeout < settings.request_timeout:
        most, default = settings.max_request_timeout, settings.request_timeout
        if "max_request_timeout" in origin:  # the user lowered the ceiling below the default
            raise ConfigError(
                key("max_request_timeout"),
                f"must be at least request_timeout ({default:g}), got {most:g}",
            )
        raise ConfigError(
            key("request_timeout"),
            f"must not exceed max_request_timeout ({most:g}); raise max_request_timeout "
            f"under [gateway] in the TOML file, got {default:g}",
        )
    if settings.max_body_bytes < 1024:
        raise ConfigError(key("max_body_bytes"), "must be at least 1024")
    if settings.max_event_bytes < 1024:  # no upstream stream fits in less
        raise ConfigError(key("max_event_bytes"), "must be at least 1024")
    for name in ("max_held_bytes", "max_response_bytes"):
        if getattr(settings, name) < 1024:
            raise ConfigError(key(name), "must be at least 1024")
    for name in (
        "send_timeout",
        "max_stream_duration",
        "client_header_timeout",
        "client_body_timeout",
        "keepalive_timeout",
    ):
        if getattr(settings, name) <= 0:
            raise ConfigError(key(name), "must be positive")
    for name in ("max_client_connections", "backlog"):
        if getattr(settings, name) < 1:
            raise ConfigError(key(name), "must be at least 1")


def _cache_settings(table: Mapping[str, Any], env: Mapping[str, str]) -> CacheSettings:
    """``[cache]``, with ``REDIS_URL`` over ``cache.redis_url``; errors name the key."""
    models = _modes(table, "cache.models", CACHE_MODES)
    rest = {k: v for k, v in table.items() if k != "models"}
    _check_keys(rest, _CACHE_FIELDS, "cache")
    values = {k: _coerce(f"cache.{k}", str(_CACHE_FIELDS[k]), v) for k, v in rest.items()}
    origin = {k: f"cache.{k}" for k in values}
    values["redis_url"] = _redis_url(values, origin, env) or None
    cache = CacheSettings(models=models, **values)

    def key(name: str) -> str:
        return origin.get(name, f"cache.{name}")

    for name in ("ttl", "max_ttl", "redis_timeout", "redis_retry"):
        if getattr(cache, name) <= 0:
            raise ConfigError(key(name), "must be positive")
    if cache.max_ttl < cache.ttl:
        raise ConfigError(key("max_ttl"), f"must be at least ttl ({cache.ttl:g})")
    if cache.max_entries < 1:
        raise ConfigError(key("max_entries"), "must be at least 1")
    if cache.max_entry_bytes < 1024:
        raise ConfigError(key("max_entry_bytes"), "must be at least 1024")
    if cache.max_bytes < cache.max_entry_bytes:
        raise ConfigError(
            key("max_bytes"), f"must be at least max_entry_bytes ({cache.max_entry_bytes})"
        )
    _check_redis_url(cache.redis_url, key("redis_url"))
    return cache


def _redis_url(values: dict[str, Any], origin: dict[str, str], env: Mapping[str, str]) -> str:
    """A table's ``redis_url``, or ``REDIS_URL`` over it (noted in ``origin``); "" if none."""
    if "REDIS_URL" in env:
        values["redis_url"] = env["REDIS_URL"]
        origin["redis_url"] = "REDIS_URL"
    return str(values.get("redis_url") or "").strip()


def _check_redis_url(url: str | None, key: str) -> None:
    """A Redis URL the client can use, and the client installed; errors name ``key``."""
    if url is None:
        return
    scheme = urlsplit(url).scheme
    if scheme not in ("redis", "rediss", "unix"):
        wanted = "must be a redis://, rediss:// or unix:// URL"
        raise ConfigError(key, f"{wanted}, got {_shown(url)!r}")
    if importlib.util.find_spec("redis") is None:
        raise ConfigError(
            key, "needs the optional Redis client: pip install 'llm-failover-gateway[redis]'"
        )


def _sharing_settings(
    table: Mapping[str, Any], env: Mapping[str, str], cache: CacheSettings
) -> SharingSettings:
    """``[sharing]``: its own ``redis_url``, else ``REDIS_URL`` or the cache's (one Redis
    serves both unless told otherwise); errors name the key."""
    _check_keys(table, _SHARING_FIELDS, "sharing")
    values = {k: _coerce(f"sharing.{k}", str(_SHARING_FIELDS[k]), v) for k, v in table.items()}
    origin = {k: f"sharing.{k}" for k in values}
    values["redis_url"] = _redis_url(values, origin, env) or cache.redis_url
    sharing = SharingSettings(**values)
    for name in ("redis_timeout", "redis_retry"):
        if getattr(sharing, name) <= 0:
            raise ConfigError(origin.get(name, f"sharing.{name}"), "must be positive")
    _check_redis_url(sharing.redis_url, origin.get("redis_url", "cache.redis_url"))
    return sharing


def _modes(table: Mapping[str, Any], key: str, allowed: tuple[str, ...]) -> dict[str, str]:
    """A ``models`` table (model or alias = mode), each mode one of ``allowed``."""
    models = table.get("models", {})
    if not isinstance(models, dict):
        raise ConfigError(key, "must be a table")
    for name, mode in models.items():
        if mode not in allowed:
            raise ConfigError(f"{key}.{name}", f"must be one of {', '.join(allowed)}, got {mode!r}")
    return dict(models)


def _rescue_settings(table: Mapping[str, Any]) -> RescueSettings:
    """``[rescue]``; errors name the key."""
    models = _modes(table, "rescue.models", RESCUE_MODES)
    rest = {k: v for k, v in table.items() if k != "models"}
    _check_keys(rest, _RESCUE_FIELDS, "rescue")
    values = {k: _coerce(f"rescue.{k}", str(_RESCUE_FIELDS[k]), v) for k, v in rest.items()}
    rescue = RescueSettings(models=models, **values)
    if rescue.max_rescues < 1:
        raise ConfigError("rescue.max_rescues", "must be at least 1")
    if rescue.max_prefix_bytes < 1024:
        raise ConfigError("rescue.max_prefix_bytes", "must be at least 1024")
    if rescue.keepalive <= 0:
        raise ConfigError("rescue.keepalive", "must be positive")
    return rescue


def _access_policy(
    env: Mapping[str, str], keys_file: str | None, loopback: bool, file_key: str
) -> tuple[AccessPolicy, dict[str, ClientKey]]:
    """Client keys from ``GATEWAY_API_KEYS`` (plain, comma-separated) and a file of SHA-256
    digests (one per line, ``#`` comments, optionally followed by ``name=NAME``, ``rpm=N``
    and ``tpm=N``); the admin key from ``GATEWAY_ADMIN_KEY``. Returns the policy and what
    the file's lines say about their keys. ``file_key`` names where ``keys_file`` came
    from, for the error when it cannot be read."""
    keys = {digest(k.strip()) for k in env.get("GATEWAY_API_KEYS", "").split(",") if k.strip()}
    clients: dict[str, ClientKey] = {}
    if keys_file:
        try:
            with open(keys_file, encoding="utf-8") as f:
                lines = [line.split("#", 1)[0].split() for line in f]
        except OSError as e:
            raise ConfigError(file_key, f"cannot read {keys_file}: {e.strerror}") from None
        for n, words in enumerate(lines, 1):
            if not words:
                continue
            key = words[0].lower()
            if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
                raise ConfigError(
                    "api_keys_file", f"line {n} of {keys_file} is not a SHA-256 hex digest"
                )
            keys.add(key)
            if len(words) > 1:
                clients[key] = _client_key(words[1:], f"line {n} of {keys_file}")
    admin = env.get("GATEWAY_ADMIN_KEY", "").strip()
    policy = AccessPolicy(frozenset(keys), digest(admin) if admin else None, loopback)
    return policy, clients


def _client_key(attributes: list[str], where: str) -> ClientKey:
    """``name=NAME rpm=N tpm=N`` after a digest in the keys file. The words are never
    quoted back: a key pasted there by mistake must not reach the log."""
    values: dict[str, str] = {}
    for word in attributes:
        name, sep, value = word.partition("=")
        if not sep or name not in ("name", "rpm", "tpm"):
            raise ConfigError(
                "api_keys_file", f"{where}: expected name=NAME, rpm=N or tpm=N after the digest"
            )
        if name in values:
            raise ConfigError("api_keys_file", f"{where}: {name}= given twice")
        values[name] = value
    name = values.get("name")
    if name is not None and not _CLIENT_NAME.fullmatch(name):
        raise ConfigError(
            "api_keys_file", f"{where}: name= must be 1-64 letters, digits, '.', '_' or '-'"
        )

    def limit(k: str) -> float | None:
        if k not in values:
            return None
        try:
            return float(_coerce(k, "float", values[k]))
        except ConfigError:
            raise ConfigError(
                "api_keys_file", f"{where}: {k}= must be a finite number, 0 or more"
            ) from None

    return ClientKey(name, limit("rpm"), limit("tpm"))


def _quotas(table: Mapping[str, Any], clients: dict[str, ClientKey], keyed: bool) -> QuotaSettings:
    """``[clients]`` defaults and the keys file's per-key quotas."""
    _check_keys(table, _CLIENT_FIELDS, "clients")
    values = {k: _coerce(f"clients.{k}", _CLIENT_FIELDS[k], v) for k, v in table.items()}
    for k, v in values.items():
        if v and not keyed:
            raise ConfigError(
                f"clients.{k}",
                "applies to client keys, and none is set (GATEWAY_API_KEYS or api_keys_file)",
            )
    return QuotaSettings(**values, keys=clients)


def _build_provider(
    name: str,
    tables: Mapping[str, Any],
    defaults: Mapping[str, Any],
    env: Mapping[str, str],
) -> ProviderConfig | None:
    """One provider's config, or None when its base URL is empty (disabled)."""
    prefix = f"providers.{name}"
    table = tables.get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(prefix, "must be a table")
    values: dict[str, Any] = {
        "display_name": _DISPLAY_NAMES.get(name, name),
        "model": _DEFAULT_MODELS.get(name),
    }
    if name in _DEFAULT_BASE_URLS:
        values["base_url"] = _DEFAULT_BASE_URLS[name]
    values.update(defaults)
    own = _provider_values(table, prefix)
    values.update(own)
    # Where each value came from: errors name the [defaults] key, the provider's own key
    # or the environment variable, whichever the user wrote.
    origin = {k: f"defaults.{k}" for k in defaults}
    origin.update({k: f"{prefix}.{k}" for k in own})
    key_env = values.pop("api_key_env", None)
    if key_env and env.get(key_env):
        values["api_key"] = env[key_env]
    values.update(_env_overrides(env, name))

    def key(k: str) -> str:
        return origin.get(k, f"{prefix}.{k}")

    base_key = f"{_ENV_PREFIX[name]}_BASE_URL" if name in _ENV_PREFIX else f"{prefix}.base_url"
    if "base_url" not in values:
        raise ConfigError(f"{prefix}.base_url", "is required for an extra provider")
    if not values["base_url"].strip():
        return None
    dialect = values.setdefault("dialect", "openai")
    if dialect not in DIALECTS:
        raise ConfigError(key("dialect"), f"unknown dialect (known: {', '.join(DIALECTS)})")
    for k in own:
        allowed = _DIALECT_KEYS.get(k, (dialect,))
        if dialect not in allowed:
            raise ConfigError(
                key(k), f"applies to the {' and '.join(allowed)} dialect, not {dialect!r}"
            )
    for k in _COMPAT_KEYS:  # local servers differ from OpenAI: on unless turned off
        values.setdefault(k, dialect == "openai" and name in _LOCAL_SERVERS)
    suffix = getattr(DIALECTS[dialect], "base_path", "/v1")
    values["base_url"] = normalize_base_url(values["base_url"], base_key, suffix)
    values["api_key"] = values.get("api_key") or None
    values["model"] = values.get("model") or None
    if name == "openai" and values["api_key"] is None and "api.openai.com" in values["base_url"]:
        # The hosted API rejects every keyless call; better skipped than probed into a 401.
        return None

    # probe_timeout too: aiohttp and asyncio read a timeout of 0 as "no timeout at all".
    for k in (
        "connect_timeout",
        "first_token_timeout",
        "idle_timeout",
        "response_timeout",
        "probe_interval",
        "probe_timeout",
        "stall_timeout",
        "burst_seconds",
    ):
        if values.get(k, 1) <= 0:
            raise ConfigError(key(k), "must be positive")
    for k in ("fail_max", "max_connections", "default_max_tokens"):
        if values.get(k, 1) < 1:
            raise ConfigError(key(k), "must be at least 1")
    return ProviderConfig(name=name, **values)
