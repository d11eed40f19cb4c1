"""Process-wide test settings: offline, quiet, and vLLM's scratch files in a temp dir."""

import os
import tempfile

_scratch = tempfile.mkdtemp(prefix="ponder-tests-")
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_CACHE_ROOT": os.path.join(_scratch, "vllm-cache"),
    "VLLM_RPC_BASE_PATH": os.path.join(_scratch, "vllm-rpc"),
    "RAY_USAGE_STATS_ENABLED": "0",
}.items():
    os.environ.setdefault(key, value)
os.makedirs(os.environ["VLLM_RPC_BASE_PATH"], exist_ok=True)
