"""API keys: who may call, which tiers, how often and how many tokens (pure; time is passed in).

Keys are kept only as the sha256 hex of the raw key. A presented key is hashed and compared with every
stored hash by `hmac.compare_digest` (no early exit). Limits are sliding windows of one-second buckets
over the last minute, so a key's state is at most two windows of 60 buckets, and a key idle for a
minute holds none. Raw keys are never stored, returned, logged or put into an error message.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from services.reasoning.tiers import TIER_NAMES, TierName
from services.reasoning.window import WINDOW_S, Window

KEY_PREFIX = "pk-"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class KeyFileError(ValueError):
    """The keys YAML (file or environment variable) is missing, unreadable or invalid."""


class AuthError(Exception):
    """A refusal: HTTP status, OpenAI error type and code, and for 429 the seconds to wait."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.type, self.param, self.retry_after = type_, param, retry_after


def hash_key(raw: str) -> str:
    """The stored form of a key: sha256 hex of its UTF-8 bytes (surrounding whitespace ignored)."""
    return hashlib.sha256(raw.strip().encode("utf-8")).hexdigest()


class KeyEntry(BaseModel):
    """One API key as the keys YAML lists it: a name, the key's hash, its limits and tiers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        pattern=NAME_PATTERN,
        description="Who holds the key; shown in logs and budgets (letters, digits, . _ -; max 64).",
    )
    sha256: str = Field(description="sha256 hex of the raw key (`ponder keys hash`); never the key itself.")
    requests_per_minute: int | None = Field(
        None, ge=1, le=1_000_000, description="Requests per minute (any /v1 endpoint); null = no limit."
    )
    tokens_per_minute: int | None = Field(
        None, ge=1, le=1_000_000_000, description="Completion tokens per minute; null = no limit."
    )
    tiers: tuple[TierName, ...] = Field(
        TIER_NAMES, min_length=1, description="Tiers the key may use; default all."
    )

    @field_validator("sha256", mode="before")
    @classmethod
    def _hex(cls, v: object) -> object:
        # The value is never echoed: someone may have pasted a raw key here by mistake.
        if not isinstance(v, str):
            raise ValueError("must be a string of 64 hex characters")
        v = v.strip().lower()
        if v.startswith(KEY_PREFIX):
            raise ValueError("looks like a raw key; put its sha256 here (`ponder keys hash`), never the key")
        if len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
            raise ValueError(f"must be 64 hex characters (the key's sha256); got {len(v)} characters")
        return v


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[KeyEntry] = Field(default_factory=list, description="The API keys.")


def _entry_label(raw: object, index: int) -> str:
    name = raw.get("name") if isinstance(raw, dict) else None
    return f"keys[{index}]" + (f" (name {name!r})" if isinstance(name, str) and len(name) <= 64 else "")


def _describe(exc: ValidationError, data: object) -> str:
    """pydantic's errors without their input values (which may hold secrets), naming the entry."""
    raw_keys = data.get("keys") if isinstance(data, dict) else None
    lines = []
    for err in exc.errors(include_input=False, include_url=False):
        loc = list(err["loc"])
        where = ".".join(str(p) for p in loc) or "the document"
        if len(loc) >= 2 and loc[0] == "keys" and isinstance(loc[1], int) and isinstance(raw_keys, list):
            where = _entry_label(raw_keys[loc[1]], loc[1]) + "".join(f".{p}" for p in loc[2:])
        lines.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(lines)


def parse_keys(text: str, source: str) -> list[KeyEntry]:
    """Validate a keys YAML document (`keys: [{name, sha256, ...}]`); errors name the entry."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:  # its message quotes the text; say only where
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise KeyFileError(f"{source}: not valid YAML{where}") from None
    if data is None:
        return []
    try:
        keys = KeysFile.model_validate(data).keys
    except ValidationError as exc:
        raise KeyFileError(f"{source}: {_describe(exc, data)}") from None
    check_unique([(k, f"{source} keys[{i}]") for i, k in enumerate(keys)])
    return keys


def check_unique(entries: list[tuple[KeyEntry, str]]) -> None:
    """Two entries may share neither a name nor a key."""
    names: dict[str, str] = {}
    hashes: dict[str, str] = {}
    for key, where in entries:
        if key.name in names:
            raise KeyFileError(f"duplicate key name {key.name!r}: {names[key.name]} and {where}")
        if key.sha256 in hashes:
            raise KeyFileError(
                f"the same key is listed twice: {hashes[key.sha256]} and {where} ({key.name!r})"
            )
        names[key.name], hashes[key.sha256] = where, where


def read_keys(
    api_keys_file: str | None, api_keys_env: str | None, environ: Mapping[str, str] | None = None
) -> list[KeyEntry]:
    """The keys of both sources (either may be None); [] when neither is set (no authentication)."""
    environ = os.environ if environ is None else environ
    found: list[tuple[KeyEntry, str]] = []
    if api_keys_file is not None:
        source = f"auth.api_keys_file {api_keys_file}"
        try:
            with open(api_keys_file, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise KeyFileError(f"{source}: cannot read it ({exc.strerror or exc})") from None
        found += [(k, f"{source} keys[{i}]") for i, k in enumerate(parse_keys(text, source))]
    if api_keys_env is not None:
        source = f"auth.api_keys_env ${api_keys_env}"
        if api_keys_env not in environ:
            raise KeyFileError(f"{source}: the environment variable is not set")
        found += [(k, f"{source} keys[{i}]") for i, k in enumerate(parse_keys(environ[api_keys_env], source))]
    check_unique(found)
    if (api_keys_file is not None or api_keys_env is not None) and not found:
        raise KeyFileError(
            "auth is configured but lists no keys, so every request would be refused; "
            "add one (`ponder keys new NAME`) or unset auth.api_keys_file / auth.api_keys_env"
        )
    return [k for k, _ in found]


@dataclass
class _Usage:
    requests: Window = field(default_factory=Window)
    tokens: Window = field(default_factory=Window)


class KeyRing:
    """The configured keys and their recent use, one per router replica (chat completions are also
    held cluster-wide by depth control at admission: services/reasoning/budgets.limit_key)."""

    def __init__(self, keys: Iterable[KeyEntry]) -> None:
        self.keys = tuple(keys)
        check_unique([(k, f"keys[{i}]") for i, k in enumerate(self.keys)])
        self._digests = [(bytes.fromhex(k.sha256), k) for k in self.keys]
        self.by_name = {k.name: k for k in self.keys}
        self._usage: dict[str, _Usage] = {}
        self._swept = float("-inf")

    def authenticate(self, authorization: str | None) -> KeyEntry:
        """The key an `Authorization: Bearer <key>` header names; 401 when missing or unknown."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        if not scheme:
            raise AuthError(
                401, "missing_api_key", "You didn't provide an API key. Send `Authorization: Bearer <key>`."
            )
        if scheme.lower() != "bearer":
            raise AuthError(401, "invalid_api_key", "Authorization must be `Bearer <key>`.")
        token = token.strip()
        if not token:
            raise AuthError(401, "missing_api_key", "The Authorization header carries no API key.")
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        match = None
        for stored, key in self._digests:  # every key is compared: the time does not say which matched
            if hmac.compare_digest(stored, digest) and match is None:
                match = key
        if match is None:
            raise AuthError(401, "invalid_api_key", "Incorrect API key provided.")
        return match

    def authorize(self, key: KeyEntry, tier: str) -> None:
        """403 when the key may not use `tier`."""
        if tier not in key.tiers:
            raise AuthError(
                403,
                "tier_not_allowed",
                f"This API key may use the tiers {', '.join(key.tiers)}; the request's tier is {tier}. "
                "Name an allowed tier in reasoning.tier.",
                type_="permission_error",
                param="reasoning.tier",
            )

    def admit(self, key: KeyEntry, now: float) -> None:
        """Count one request; 429 (and nothing counted) when the key's request rate is used up."""
        limit = key.requests_per_minute
        if limit is None:
            return
        window = self._of(key, now).requests
        used = window.total(now)
        if used >= limit:
            wait = window.retry_after(now, limit)
            raise AuthError(
                429,
                "rate_limit_exceeded",
                f"Rate limit reached for requests per minute: limit {limit}, used {used}. "
                f"Try again in {wait} s.",
                type_="requests",
                retry_after=wait,
            )
        window.add(1, now)

    def record_tokens(self, key: KeyEntry, n: int, now: float) -> None:
        """Count completion tokens a finished request generated."""
        if key.tokens_per_minute is not None and n > 0:
            self._of(key, now).tokens.add(n, now)

    def check_tokens(self, key: KeyEntry, now: float) -> None:
        """429 when the key's completion tokens in the last minute reach its limit."""
        limit = key.tokens_per_minute
        if limit is None:
            return
        usage = self._usage.get(key.name)
        if usage is None:
            return
        used = usage.tokens.total(now)
        if used >= limit:
            wait = usage.tokens.retry_after(now, limit)
            raise AuthError(
                429,
                "rate_limit_exceeded",
                f"Rate limit reached for completion tokens per minute: limit {limit}, used {used}. "
                f"Try again in {wait} s.",
                type_="tokens",
                retry_after=wait,
            )

    def used(self, key: KeyEntry, now: float) -> tuple[int, int]:
        """(requests, completion tokens) counted for the key in the last minute."""
        usage = self._usage.get(key.name)
        return (0, 0) if usage is None else (usage.requests.total(now), usage.tokens.total(now))

    def tracked(self) -> int:
        return len(self._usage)

    def _of(self, key: KeyEntry, now: float) -> _Usage:
        if now - self._swept >= WINDOW_S:
            self.sweep(now)
        return self._usage.setdefault(key.name, _Usage())

    def sweep(self, now: float) -> None:
        """Drop the state of keys with nothing in their windows."""
        self._swept = now
        idle = [n for n, u in self._usage.items() if not (u.requests.total(now) or u.tokens.total(now))]
        for name in idle:
            del self._usage[name]
