"""API keys: ``Authorization: Bearer <key>``, compared in constant time.

With no keys configured every request is anonymous (owner ``""``). With keys, every route
but ``/health`` (and the static docs) needs one, and a conversation belongs to the key that
created it: the owner stored with it is a SHA-256 fingerprint, never the key itself.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass

from fastapi import Request

from bitserve.api.errors import AuthenticationError
from bitserve.engine.types import GenerationRequest


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: ``owner`` scopes conversations ("" when auth is off)."""

    owner: str


def key_fingerprint(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]


class KeyChecker:
    """Holds the configured keys as bytes; ``check`` compares against all of them (no early
    exit, so timing says nothing about which key or prefix matched)."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self._keys = [k.encode("utf-8") for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None) -> Principal:
        if not self._keys:
            return Principal("")
        if not authorization:
            raise AuthenticationError("Missing API key: send it as 'Authorization: Bearer <key>'.")
        scheme, _, token = authorization.partition(" ")
        given = token.strip().encode("utf-8")
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(given, key)
        if scheme.lower() != "bearer" or not matched:
            raise AuthenticationError("Incorrect API key provided.")
        return Principal(key_fingerprint(given.decode("utf-8")))


def require_key(request: Request) -> Principal:
    """FastAPI dependency: the caller's ``Principal`` (401 without a valid key)."""
    checker: KeyChecker = request.app.state.keys
    return checker.check(request.headers.get("authorization"))


def scope_to_caller(requests: Iterable[GenerationRequest | None], request: Request) -> None:
    """Give the engine ``requests`` the caller's prefix-cache scope (its key fingerprint;
    "" without keys): a key's requests reuse only KV its own requests computed, so no key
    learns from cache hits what another key sent."""
    checker: KeyChecker = request.app.state.keys
    scope = checker.check(request.headers.get("authorization")).owner if checker.enabled else ""
    for req in requests:
        if req is not None:
            req.cache_scope = scope


def require_configured_key(request: Request) -> Principal:
    """Like :func:`require_key`, but a server without keys refuses too: the BitMind oracle
    API is defined as Bearer-authenticated, and an open oracle route would hand any
    client on the network a model its operator meant to put behind keys."""
    checker: KeyChecker = request.app.state.keys
    if not checker.enabled:
        raise AuthenticationError(
            "The oracle routes need an API key, and this server has none configured: "
            "start it with --api-key KEY (or --api-keys-file FILE)."
        )
    return checker.check(request.headers.get("authorization"))
