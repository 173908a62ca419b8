"""Where shared resilience state lives: a Redis connection built from an environment variable.

The URL of a Redis server is a secret-bearing setting (it may hold a password), so settings
never carry it inline: they name the environment variable that holds it, and this module
reads it. Errors name the setting key, never the URL.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from mcp_fhir._exceptions import ConfigError

__all__ = ["DEFAULT_REDIS_CONNECT_TIMEOUT", "DEFAULT_REDIS_SOCKET_TIMEOUT", "redis_from_env"]

DEFAULT_REDIS_SOCKET_TIMEOUT = 2.0
DEFAULT_REDIS_CONNECT_TIMEOUT = 2.0


def redis_from_env(
    env_name: str | None,
    key: str,
    *,
    environ: Mapping[str, str] | None = None,
    socket_timeout: float = DEFAULT_REDIS_SOCKET_TIMEOUT,
    connect_timeout: float = DEFAULT_REDIS_CONNECT_TIMEOUT,
) -> Any:
    """A ``redis.asyncio.Redis`` for the URL held in the environment variable ``env_name``.

    ``key`` is the settings key that named the variable (e.g. ``cache.redis_url_env``); it is
    the only thing an error message mentions.
    """
    env = os.environ if environ is None else environ
    if not env_name:
        raise ConfigError(key, "must name an environment variable holding the Redis URL")
    url = env.get(env_name)
    if not url:
        raise ConfigError(key, "names an environment variable that is unset or empty")
    try:
        import redis.asyncio as redis_asyncio
    except ImportError as exc:  # pragma: no cover - redis is a declared extra
        raise ConfigError(key, "the 'redis' package is not installed (pip install mcp-fhir[redis])") from exc
    try:
        return redis_asyncio.Redis.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=connect_timeout
        )
    except ValueError as exc:
        raise ConfigError(key, "the environment variable does not hold a valid Redis URL") from exc
