"""Which transport a process gets: NIXL (UCX) when it imports here, else BytesTransport.

NIXL is imported only from here (and kvstore/transport/nixl.py, which this loads lazily): a process
without it, or with its libraries missing, still runs, moving bytes over Ray.
"""

from __future__ import annotations

import logging

from kvstore.transport.base import BytesTransport, Transport

log = logging.getLogger(__name__)

NIXL_PACKAGES = ("nixl_cu13", "nixl_cu12")  # GPU images pin the CUDA 13 build; CPU machines CUDA 12


def nixl_missing() -> str | None:
    """Why NIXL cannot be imported here (None: it can), looked up as kvstore/transport/nixl.py does."""
    import importlib

    why = []
    for pkg in NIXL_PACKAGES:
        try:
            importlib.import_module(f"{pkg}._api")
            return None
        except (ImportError, OSError) as e:  # OSError: the package is there, its libraries are not
            why.append(f"{pkg}: {e}")
    return "NIXL not importable (" + "; ".join(why) + ")"


def make_transport(name: str, prefer: str = "nixl", progress_thread: bool = True) -> Transport:
    """NIXL (UCX) when asked for (`nixl`) and importable, else BytesTransport (`ray`: bytes in Ray
    calls, the same word as the config's `kvstore.transport`); NIXL is imported only here.
    `progress_thread=False` for a process that only initiates transfers (see NixlTransport)."""
    if prefer == "nixl":
        try:
            from kvstore.transport.nixl import NixlTransport
        except (ImportError, OSError) as e:  # OSError: the package is there, its libraries are not
            log.warning("NIXL not importable (%s): falling back to BytesTransport", e)
        else:
            return NixlTransport(name, progress_thread)
    elif prefer != "ray":
        raise ValueError(f"unknown transport {prefer!r} (nixl or ray)")
    return BytesTransport(name)
