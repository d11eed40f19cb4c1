"""Real pulls into the shared cache (~/.cache/ponder or $PONDER_HOME) and real vLLM loads.

The first run downloads and converts SmolLM2 (~35 s); later runs reuse the installed folder.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster import models

pytestmark = pytest.mark.engine

PROMPT = "The answer to 17 + 25 is"


@pytest.fixture(scope="session")
def smollm2() -> Path:
    return models.ensure_model(models.SMALL_MODEL)


@pytest.fixture(scope="session")
def tiny() -> Path:
    return models.ensure_model(models.TINY_MODEL)


@pytest.fixture(scope="module")
def vllm_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Small in-process engines, no network, vLLM's sockets and caches in a temp dir."""
    tmp = tmp_path_factory.mktemp("vllm")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        mp.setenv("VLLM_NO_USAGE_STATS", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("VLLM_CACHE_ROOT", str(tmp / "cache"))
        mp.setenv("VLLM_RPC_BASE_PATH", str(tmp / "rpc"))
        yield


def _greedy_twice(model: Path, prompt: str, max_tokens: int) -> tuple[list[int], list[int], str]:
    """Load ``model`` in vLLM, generate greedily twice; return both token lists and the text."""
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(model),
        enforce_eager=True,
        kv_cache_memory_bytes=64 << 20,
        max_model_len=2048,
        seed=0,
    )
    try:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        first, second = (llm.generate([prompt], params)[0].outputs[0] for _ in range(2))
        return list(first.token_ids), list(second.token_ids), first.text
    finally:
        del llm
        gc.collect()


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def test_smollm2_pull_is_complete_and_loads_in_transformers(smollm2: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    assert models.is_installed(models.SMALL_MODEL)
    marker = _json(smollm2 / models.MARKER)
    assert marker["gguf_sha256"] == models.REGISTRY[models.SMALL_MODEL].sha256

    config = AutoConfig.from_pretrained(smollm2)
    assert config.model_type == "llama" and config.num_hidden_layers == 30
    assert _json(smollm2 / "config.json")["rope_theta"] == 100000.0
    assert "quantization_config" not in _json(smollm2 / "config.json")
    assert _json(smollm2 / "tokenizer_config.json")["tokenizer_class"] == "PreTrainedTokenizerFast"

    tok = AutoTokenizer.from_pretrained(smollm2)
    assert tok.eos_token == "<|im_end|>"
    assert tok.decode(tok.encode("17 + 25 = 42", add_special_tokens=False)) == "17 + 25 = 42"
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_ensure_model_is_fast_when_installed(smollm2: Path, tiny: Path) -> None:
    t0 = time.monotonic()
    assert models.ensure_model(models.SMALL_MODEL) == smollm2
    assert models.ensure_model(models.TINY_MODEL) == tiny
    assert time.monotonic() - t0 < 0.5


def test_tiny_model_generates_deterministically_in_vllm(tiny: Path, vllm_env: None) -> None:
    first, second, text = _greedy_twice(tiny, PROMPT, max_tokens=16)
    assert len(first) == 16
    assert first == second
    assert isinstance(text, str)


def test_smollm2_generates_in_vllm(smollm2: Path, vllm_env: None) -> None:
    first, second, text = _greedy_twice(smollm2, PROMPT, max_tokens=8)
    assert first == second
    assert any(ch.isalnum() for ch in text), text  # real weights: readable output
