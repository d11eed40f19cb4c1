"""`ponder bench kv-path` runs small, and runs where a GPU machine has no vLLM and no Ray."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BLOCKED = "import sys; sys.modules['vllm'] = sys.modules['ray'] = None"  # `import vllm` now fails


def test_kv_path_bench_runs_without_vllm_or_ray_and_writes_every_key(tmp_path):
    out = tmp_path / "kv_path.json"
    argv = ["--shape", "smollm2", "--tokens", "512,1024", "--chunk-tokens", "64", "--repeats", "1"]
    code = (
        f"{BLOCKED}; import runpy; sys.argv = ['kv_path', *{argv!r}, '--recompute', '--json', {str(out)!r}]; "
        "runpy.run_module('bench.kv_path', run_name='__main__')"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "load/bulk" in run.stdout  # the table
    res = json.loads(out.read_text())
    assert res["device"] == "cpu" and res["shape"] == "smollm2" and res["chunk_tokens"] == 64
    assert set(res["by_tokens"]) == {"512", "1024"}
    for row in res["rows"]:
        assert row["bit_exact"] is True
        for key in ("load_vs_bulk", "save_vs_bulk", "restore_vs_recompute"):
            assert row[key] > 0, key
        assert 0 <= row["save_blocking_fraction"] < 1  # the step only enqueues
    for by in res["by_tokens"].values():
        assert by["load_vs_bulk"] > 0 and by["save_vs_bulk"] > 0 and by["restore_vs_recompute"] > 0


def test_kv_path_refuses_a_chunk_that_does_not_divide_the_context(capsys):
    from cluster import cli

    argv = ["bench", "kv-path", "--shape", "smollm2", "--tokens", "500", "--repeats", "1"]
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    assert code not in (0, None)
