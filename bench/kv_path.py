"""`ponder bench kv-path`: the connector's worker-side KV data path against the machine's bulk copy.

Drives `kvstore.connector.datapath.KvDataPath` — the code the vLLM connector's worker hooks run — on a paged
cache of a real model's shape (random tensors, no scheduler, no vLLM, no Ray), with an in-process
store shard (`LocalStore`; page-locked on CUDA), for each context length:
- save: `submit_saves` of every chunk of the context (what `wait_for_save` does after a prefill),
  then until the save thread has stored them: GB/s, `save_vs_bulk`, and the time the step itself
  was blocked (`save_blocked_ms`; `save_blocking_fraction` = blocked / whole save);
- load: `start_loads` + `wait_layer` for every layer + `finish_loads` of the same chunks into other
  cache blocks (what a restored round does), checked bit-exact against the source blocks: GB/s,
  `load_vs_bulk`;
- bulk: CPU, a numpy memcpy of the same total bytes (source random, destination touched, best of
  N); CUDA, one page-locked host->device copy of the same bytes;
- recompute (CUDA by default, CPU with --recompute): a prefill of the same tokens by a random-init
  model of that shape (transformers, SDPA, bf16, logits of the last token only):
  `restore_vs_recompute` = prefill / load, `save_blocked_vs_prefill` = blocked / prefill.

It needs only torch, numpy, msgpack, pydantic, xxhash (+ transformers for recompute), so it runs on
a GPU machine without vLLM or Ray:  python -m bench.kv_path --device cuda --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from bench import write_json
from kvstore.connector.datapath import KvDataPath
from kvstore.connector.engine_store import LocalStore
from kvstore.connector.layout import CacheLayout
from kvstore.digest import Hasher
from kvstore.planner import KvTags, LoadSpec, SaveSpec
from kvstore.shard.pool import slot_bytes_for


@dataclass(frozen=True)
class Shape:
    layers: int
    kv_heads: int
    head_dim: int
    hidden: int
    heads: int
    intermediate: int
    vocab: int
    arch: str  # transformers model class for the recompute


SHAPES = {
    "llama-8b": Shape(32, 8, 128, 4096, 32, 14336, 128256, "llama"),
    "qwen-0.5b": Shape(24, 2, 64, 896, 14, 4864, 151936, "qwen2"),
    "smollm2": Shape(30, 3, 64, 576, 9, 1536, 49152, "llama"),
}
MODEL_KEY = "bench|bfloat16"


COMMAND = ("kv-path", "the connector's worker-side KV data path vs bulk copy (CPU or CUDA)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-8b")
    p.add_argument(
        "--tokens",
        default="2048,8192",
        help="context lengths, comma-separated (CUDA default: 2048,8192,32768)",
    )
    p.add_argument("--chunk-tokens", type=int, default=256, help="tokens per store chunk")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions; the best is kept")
    p.add_argument("--recompute", action="store_true", help="also time a prefill on CPU (slow)")
    p.add_argument("--no-recompute", action="store_true", help="skip the prefill on CUDA")
    p.add_argument("--hash-threads", type=int, default=None, help="checksum threads (default min(8, CPUs))")
    p.add_argument("--json", dest="json_path", help="write the results as JSON here")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best(fn, repeats: int, device: torch.device) -> float:
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def _cache(shape: Shape, device: torch.device, blocks: int, block: int) -> list[torch.Tensor]:
    """vLLM's per-layer layouts: CPU [blocks, kv_heads, block, 2*head_dim]; FlashAttention on CUDA."""
    if device.type == "cuda":
        dims = (2, blocks, block, shape.kv_heads, shape.head_dim)
    else:
        dims = (blocks, shape.kv_heads, block, 2 * shape.head_dim)
    gen = torch.Generator(device=device).manual_seed(0)
    out = []
    for _ in range(shape.layers):
        t = torch.empty(dims, dtype=torch.bfloat16, device=device)
        t.view(torch.int16).random_(-(2**15), 2**15, generator=gen)  # any bit pattern: a copy must keep it
        out.append(t)
    return out


def bulk_seconds(nbytes: int, device: torch.device, repeats: int) -> float:
    """The machine's bulk copy of `nbytes`: numpy memcpy on CPU, one pinned H2D DMA on CUDA."""
    if device.type == "cuda":
        src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return _best(lambda: dst.copy_(src, non_blocking=True), repeats, device)
    src = np.random.default_rng(1).integers(0, 256, nbytes, dtype=np.uint8)
    dst = np.ones(nbytes, dtype=np.uint8)  # touched: no page faults inside the timing
    return _best(lambda: np.copyto(dst, src), repeats, device)


def prefill_seconds(shape: Shape, tokens: int, device: torch.device, repeats: int = 2) -> float:
    """A prefill of `tokens` tokens by a random-init model of this shape (the work a restore saves)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        shape.arch,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        vocab_size=shape.vocab,
        max_position_embeddings=max(tokens, 4096),
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, shape.vocab, (1, tokens), device=device)

    def run() -> None:
        with torch.inference_mode():
            model(input_ids=ids, use_cache=True, logits_to_keep=1)

    run()  # warm-up
    t = _best(run, repeats, device)
    model = None  # noqa: F841 - frees the weights before the next context length
    gc.collect()
    return t


def measure_one(shape: Shape, tokens: int, device: torch.device, args: argparse.Namespace) -> dict:
    block = 16 if device.type == "cuda" else 32  # vLLM's GPU default; the smallest the CPU backend takes
    if args.chunk_tokens % block or tokens % args.chunk_tokens:
        raise SystemExit(f"--chunk-tokens must divide {tokens} and be a multiple of {block}")
    cb = args.chunk_tokens // block
    n = tokens // block
    layers = _cache(shape, device, 2 * n + 1, block)
    layout = CacheLayout.detect(layers, 2 * n + 1, cb)
    chunks = n // cb
    store = LocalStore(chunks + 1, slot_bytes_for(layout.chunk_bytes), pin=device.type == "cuda")
    path = KvDataPath(store, layout, layers, MODEL_KEY, hasher=Hasher(args.hash_threads))
    # vLLM hands out cache blocks from a free list that is fragmented once it has been used for a
    # while: the blocks of a context are scattered, in no order (seeded).
    perm = torch.randperm(2 * n + 1, generator=torch.Generator().manual_seed(tokens)).tolist()
    src, dst = perm[:n], perm[n : 2 * n]
    hashes = [f"{tokens:08x}{i:024x}" for i in range(chunks)]
    tags = KvTags("bench", 0, "")
    payload = chunks * layout.chunk_bytes
    blocked, saves = [], []
    for r in range(args.repeats):
        store.shard.finish_session("bench")  # an empty store: every chunk is written again
        _sync(device)
        t0 = time.perf_counter()
        blocked.append(path.submit_saves([SaveSpec(f"r{r}", tags, hashes, src)]))
        path.drain()
        saves.append(time.perf_counter() - t0)
    i = int(np.argmin(saves))
    t_save, t_blocked = saves[i], blocked[i]

    def load() -> None:
        path.start_loads([LoadSpec("load", "bench", hashes, 0, dst)])
        for k in range(layout.num_layers):
            path.wait_layer(k)
        if path.finish_loads():
            raise RuntimeError("a chunk failed to load")

    t_load = _best(load, args.repeats, device)
    idx_src = torch.tensor(src, device=device)
    idx_dst = torch.tensor(dst, device=device)
    bits = [x.view(torch.int16) for x in layers]  # random bit patterns hold NaNs: compare the bits
    exact = all(
        torch.equal(x.index_select(layout.block_dim, idx_src), x.index_select(layout.block_dim, idx_dst))
        for x in bits
    )
    path.close()
    layers.clear()  # the cache and the store go before the bulk copy allocates its buffers
    store = path = None  # noqa: F841
    gc.collect()
    t_bulk = bulk_seconds(payload, device, args.repeats)
    row = {
        "tokens": tokens,
        "chunks": chunks,
        "bytes": payload,
        "bulk_gbps": round(payload / t_bulk / 1e9, 2),
        "load_gbps": round(payload / t_load / 1e9, 2),
        "save_gbps": round(payload / t_save / 1e9, 2),
        "load_ms": round(t_load * 1e3, 2),
        "save_ms": round(t_save * 1e3, 2),
        "bulk_ms": round(t_bulk * 1e3, 2),
        "save_blocked_ms": round(t_blocked * 1e3, 3),
        "load_vs_bulk": round(t_bulk / t_load, 3),
        "save_vs_bulk": round(t_bulk / t_save, 3),
        "save_blocking_fraction": round(t_blocked / t_save, 4),
        "bit_exact": exact,
    }
    if not exact:
        raise RuntimeError(f"{tokens} tokens: the restored blocks differ from the saved ones")
    return row


def _recompute(rows: list[dict], shape: Shape, device: torch.device, progress) -> None:
    for row in rows:
        progress(f"  prefill of {row['tokens']} tokens (random-init {shape.arch}, SDPA, bf16)")
        t = prefill_seconds(shape, row["tokens"], device)
        row["prefill_ms"] = round(t * 1e3, 1)
        row["restore_vs_recompute"] = round(t / (row["load_ms"] / 1e3), 2)
        row["save_blocked_vs_prefill"] = round(row["save_blocked_ms"] / 1e3 / t, 4)


def measure(args: argparse.Namespace, progress=print) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU here")
    shape = SHAPES[args.shape]
    tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    rows = []
    for t in tokens:
        progress(f"{args.shape} on {args.device}: {t} tokens")
        rows.append(measure_one(shape, t, device, args))
        progress("  " + json.dumps(rows[-1]))
    recompute = args.recompute or (device.type == "cuda" and not args.no_recompute)
    if recompute:
        _recompute(rows, shape, device, progress)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "device": name,
        "torch": torch.__version__,
        "shape": args.shape,
        "chunk_tokens": args.chunk_tokens,
        "hash_threads": Hasher(args.hash_threads).threads,
        "rows": rows,
        "by_tokens": {
            str(r["tokens"]): {
                k: r.get(k)
                for k in (
                    "load_vs_bulk",
                    "save_vs_bulk",
                    "save_blocking_fraction",
                    "restore_vs_recompute",
                    "save_blocked_vs_prefill",
                )
            }
            for r in rows
        },
    }


def _print(res: dict) -> None:
    print(f"KV data path, {res['shape']} shape, {res['device']}, chunks of {res['chunk_tokens']} tokens")
    cols = ["tokens", "MiB", "load GB/s", "save GB/s", "bulk GB/s", "load/bulk", "save/bulk", "blocked ms"]
    extra = "prefill_ms" in res["rows"][0]
    if extra:
        cols += ["prefill ms", "restore/recompute"]
    print(" | ".join(cols))
    for r in res["rows"]:
        cells = [r["tokens"], r["bytes"] >> 20, r["load_gbps"], r["save_gbps"], r["bulk_gbps"]]
        cells += [r["load_vs_bulk"], r["save_vs_bulk"], r["save_blocked_ms"]]
        if extra:
            cells += [r["prefill_ms"], r["restore_vs_recompute"]]
        print(" | ".join(str(c) for c in cells))


def main(args: argparse.Namespace) -> int:
    if args.device == "cuda" and args.tokens == "2048,8192":
        args.tokens = "2048,8192,32768"
    res = measure(args)
    _print(res)
    if args.json_path:
        print(f"wrote {write_json(args.json_path, res)}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.kv_path", description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
