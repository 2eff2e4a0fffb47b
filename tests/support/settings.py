"""Settings for tests built from a PLANNERSYNC_* environment dict, without touching os.environ."""

from __future__ import annotations

from typing import Any

from shared.config import Settings, load_settings

FAST_LADDER = "300ms,600ms,1s"  # a retry ladder short enough for tests to climb


def nested_settings(env: dict[str, str]) -> dict[str, Any]:
    """Turn PLANNERSYNC_A__B=v into {"a": {"b": v}}, the keyword arguments ``load_settings`` takes per section."""
    out: dict[str, Any] = {}
    for name, value in env.items():
        if name.startswith("PLANNERSYNC_"):
            top, _, key = name[len("PLANNERSYNC_") :].lower().partition("__")
            out.setdefault(top, {})[key] = value
    return out


def settings_from_env(env: dict[str, str]) -> Settings:
    """Settings exactly as a worker started with environment ``env`` would load them."""
    return load_settings(environ=env, **nested_settings(env))
