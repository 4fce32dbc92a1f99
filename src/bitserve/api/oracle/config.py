"""The oracle route config: which model names the local model answers to, and per-route
defaults for ``/oracle/v1/{route}/chat[/completions]`` (BitMind-compatible clients).

File format (JSON; every key optional)::

    {
      "aliases": ["llama-3", "nvidia/Llama-3.1-Nemotron-70B-Instruct-HF"],
      "routes": {
        "1": {"defaults": {"temperature": 0.1, "top_p": 1, "max_tokens": 500, "stream": true}},
        "4": {"defaults": {"max_tokens": 500, "stream": true}, "aliases": ["other-name"]}
      }
    }

``aliases`` (top level or per route) are extra ``model`` names served by the local model;
``defaults`` fill request fields the client left out (any chat completion field). Without a
file the built-in config below is used: the documented BitMind defaults.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# the documented BitMind route defaults (issue 4, point 5); logprobs off everywhere
_BUILTIN: dict[str, Any] = {
    "aliases": ["llama-3", "nvidia/Llama-3.1-Nemotron-70B-Instruct-HF"],
    "routes": {
        "1": {"defaults": {"temperature": 0.1, "top_p": 1.0, "max_tokens": 500, "stream": True}},
        "4": {"defaults": {"max_tokens": 500, "stream": True}},
    },
}
_ALLOWED_ROUTE_KEYS = {"defaults", "aliases"}


class OracleConfigError(ValueError):
    """The oracle config file is malformed; the message says where."""


@dataclass(frozen=True, slots=True)
class OracleRoute:
    name: str
    defaults: dict[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class OracleConfig:
    aliases: tuple[str, ...]
    routes: dict[str, OracleRoute]

    @classmethod
    def builtin(cls) -> OracleConfig:
        return cls.from_dict(_BUILTIN, "<built-in>")

    @classmethod
    def load(cls, path: str | Path | None) -> OracleConfig:
        """The config in ``path`` (``None``: the built-in one)."""
        if path is None:
            return cls.builtin()
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise OracleConfigError(f"{path}: {exc}") from exc
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: Any, where: str) -> OracleConfig:
        if not isinstance(data, dict):
            raise OracleConfigError(f"{where}: the top level must be an object")
        aliases = _names(data.get("aliases", []), f"{where}: aliases")
        routes_data = data.get("routes", {})
        if not isinstance(routes_data, dict):
            raise OracleConfigError(f"{where}: routes must be an object")
        routes = {
            str(name): _route(str(name), spec, f"{where}: routes.{name}")
            for name, spec in routes_data.items()
        }
        return cls(aliases, routes)


def _names(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise OracleConfigError(f"{where} must be a list of strings")
    return tuple(value)


def _route(name: str, spec: Any, where: str) -> OracleRoute:
    if not isinstance(spec, dict):
        raise OracleConfigError(f"{where} must be an object")
    unknown = set(spec) - _ALLOWED_ROUTE_KEYS
    if unknown:
        raise OracleConfigError(f"{where}: unknown keys {sorted(unknown)}")
    defaults = spec.get("defaults", {})
    if not isinstance(defaults, dict):
        raise OracleConfigError(f"{where}.defaults must be an object")
    _check_defaults(defaults, f"{where}.defaults")
    return OracleRoute(name, dict(defaults), _names(spec.get("aliases", []), f"{where}.aliases"))


def _check_defaults(defaults: dict[str, Any], where: str) -> None:
    """Defaults a request could carry, checked as one would be: a bad default would make
    every request on the route a 400 naming a field its client never sent."""
    from pydantic import ValidationError

    from bitserve.api.chat.protocol import ChatCompletionRequest
    from bitserve.api.chat.serving import check_fields
    from bitserve.api.errors import APIError, error_body

    unknown = set(defaults) - set(ChatCompletionRequest.model_fields)
    if unknown:
        raise OracleConfigError(f"{where}: {sorted(unknown)} are not chat completion fields")
    probe = {"model": "m", "messages": [{"role": "user", "content": "x"}], **defaults}
    try:
        check_fields(ChatCompletionRequest.model_validate(probe))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise OracleConfigError(f"{where}: {problems}") from exc
    except APIError as exc:
        raise OracleConfigError(f"{where}: {error_body(exc)[1]['error']['message']}") from exc
