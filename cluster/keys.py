"""`ponder keys new NAME` and `ponder keys hash`: make an API key and the entry for the keys file.

A new key is printed once; Ponder keeps only its sha256 (docs/security.md)."""

from __future__ import annotations

import argparse
import getpass
import secrets
import sys
from typing import Any

import yaml
from pydantic import ValidationError

from cluster.errors import CliError
from services.ingress.auth import KEY_PREFIX, KeyEntry, hash_key


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def entry_yaml(entry: KeyEntry) -> str:
    """The entry as it goes under `keys:` in the keys file (limits only when set)."""
    data = entry.model_dump(exclude_none=True)
    if tuple(data["tiers"]) == KeyEntry.model_fields["tiers"].default:
        del data["tiers"]
    else:
        data["tiers"] = list(data["tiers"])
    return yaml.safe_dump([data], sort_keys=False)


def _cmd_new(args: argparse.Namespace) -> int:
    key = new_key()
    fields = {
        "name": args.name,
        "sha256": hash_key(key),
        "requests_per_minute": args.requests_per_minute,
        "tokens_per_minute": args.tokens_per_minute,
    }
    if args.tiers:
        fields["tiers"] = tuple(t.strip() for t in args.tiers.split(","))
    try:
        entry = KeyEntry(**fields)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False)
        )
        raise CliError(problems) from None
    print(f"API key for {entry.name} (shown only now; Ponder keeps its sha256, not the key):")
    print(f"  {key}")
    print("Entry for the keys file (auth.api_keys_file, or the Kubernetes Secret), under `keys:`:")
    print(entry_yaml(entry), end="")
    return 0


def _cmd_hash(_: argparse.Namespace) -> int:
    raw = getpass.getpass("API key: ") if sys.stdin.isatty() else sys.stdin.readline()
    if not raw.strip():
        raise CliError("no key on standard input")
    print(hash_key(raw))
    return 0


def add_keys_parser(subparsers: Any) -> None:
    """Register ``keys new NAME [--requests-per-minute N] [--tokens-per-minute N] [--tiers T,...]``
    and ``keys hash``."""
    keys = subparsers.add_parser("keys", help="make API keys and hash them for the keys file")
    sub = keys.add_subparsers(dest="keys_command", required=True)
    n = sub.add_parser("new", help="print a fresh API key once and its entry for the keys file")
    n.add_argument("name", help="who holds the key (letters, digits, . _ -); shown in logs")
    n.add_argument("--requests-per-minute", type=int, help="requests per minute (default: no limit)")
    n.add_argument("--tokens-per-minute", type=int, help="completion tokens per minute (default: no limit)")
    n.add_argument("--tiers", help="comma-separated tiers the key may use (default: all)")
    n.set_defaults(func=_cmd_new)
    h = sub.add_parser("hash", help="read a key from standard input and print its sha256")
    h.set_defaults(func=_cmd_hash)
