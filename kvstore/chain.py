"""Content addresses of KV chunks: a hash chain over a prompt's token ids, one link per chunk.

A chunk (the store's unit: `chunk_tokens` consecutive tokens, a whole number of vLLM blocks) holds KV
that depends on every token before it, so its address hashes the previous chunk's address with its
own tokens (as vLLM's prefix cache does per block). `BlockChain` is the same chain for any unit size:
pass the chunk size as its `block_size`. The chain starts from the model key, so blocks of
different models, dtypes or block sizes never share an address. vLLM's own block hashes cannot be
used across engines: their seed is random per process unless PYTHONHASHSEED is fixed.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

DIGEST_BYTES = 16  # 128 bits: collisions are out of reach for any store size


def model_key(model: str, dtype: object, block_size: int, chunk_tokens: int | None = None) -> str:
    """What a store chunk's bytes depend on besides its tokens: the model, its KV dtype, vLLM's block
    size and the chunk size (the store's unit, a whole number of blocks; default one block)."""
    chunk = chunk_tokens or block_size
    return f"{model}|{str(dtype).removeprefix('torch.')}|bs{block_size}|c{chunk}"


def chain_root(model_key: str) -> bytes:
    return hashlib.sha256(b"ponder-kv-chain-v1\0" + model_key.encode()).digest()[:DIGEST_BYTES]


def extend_chain(parent: bytes, tokens: Sequence[int]) -> bytes:
    packed = struct.pack(f"<{len(tokens)}q", *tokens)
    return hashlib.sha256(parent + packed).digest()[:DIGEST_BYTES]


class BlockChain:
    """The addresses of the full blocks of one growing token sequence, computed incrementally."""

    def __init__(self, model_key: str, block_size: int) -> None:
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        self.block_size = block_size
        self._links = [chain_root(model_key)]

    def __len__(self) -> int:
        return len(self._links) - 1

    def extend(self, token_ids: Sequence[int], n_blocks: int) -> list[str]:
        """Hex addresses of the first `n_blocks` blocks of `token_ids` (a prefix of what came before)."""
        bs = self.block_size
        if n_blocks * bs > len(token_ids):
            raise ValueError(f"{n_blocks} blocks need {n_blocks * bs} tokens, have {len(token_ids)}")
        for i in range(len(self), n_blocks):
            self._links.append(extend_chain(self._links[-1], token_ids[i * bs : (i + 1) * bs]))
        return [link.hex() for link in self._links[1 : n_blocks + 1]]


def block_hashes(model_key: str, token_ids: Sequence[int], block_size: int) -> list[str]:
    """Addresses of every full block of `token_ids`."""
    return BlockChain(model_key, block_size).extend(token_ids, len(token_ids) // block_size)
