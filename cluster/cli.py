"""`ponder`: serve, chat, status, models, keys, bench."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from pydantic import ValidationError

from cluster.errors import CliError
from cluster.models import ModelError
from services.config import DEFAULT_CONFIG, AppConfig
from services.ingress.auth import KeyFileError


def load_config(path: str) -> AppConfig:
    if not Path(path).is_file():
        raise CliError(f"config file not found: {path}")
    try:
        return AppConfig.load(path)
    except ValidationError as exc:
        raise CliError(f"invalid config {path}:\n{exc}") from exc
    except (FileNotFoundError, KeyFileError) as exc:
        raise CliError(str(exc)) from exc


def cmd_serve(args: argparse.Namespace) -> int:
    from cluster import local
    from cluster.models import ensure_model

    cfg = load_config(args.config)
    if args.host:
        cfg.http.host = args.host
    if args.port:
        cfg.http.port = args.port
    if not cfg.engine.model_path:
        cfg.engine.model_path = str(ensure_model(cfg.engine.model))
    stop, ready = threading.Event(), threading.Event()

    def on_signal(*_: object) -> None:
        stop.set()
        if not ready.is_set():  # still starting: abort the start-up, then clean up below
            raise KeyboardInterrupt

    def trap_signals() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)

    trap_signals()
    print(f"starting a local Ray cluster for {cfg.engine.model} ...", flush=True)
    try:
        local.start_ray(cfg)
        trap_signals()  # ray.init installs its own SIGTERM handler, which aborts the process
        try:
            local.deploy(cfg, progress=lambda m: print(m, flush=True))
        except RuntimeError as exc:  # a replica failed to start; the message says where its logs are
            raise CliError(f"the app failed to start: {exc}") from exc
        ready.set()
        print(ready_message(cfg), flush=True)
        stop.wait()
        print("shutting down (Serve, then Ray) ...", flush=True)
    except KeyboardInterrupt:
        print("interrupted during start-up; cleaning up ...", flush=True)
    finally:
        local.shutdown()
    print("stopped.")
    return 0


def ready_message(cfg: AppConfig) -> str:
    url = f"http://{cfg.http.host}:{cfg.http.port}"
    body = json.dumps(
        {
            "model": cfg.engine.model,
            "messages": [{"role": "user", "content": "What is 17 + 25?"}],
            "reasoning": {"tier": "medium"},
        }
    )
    lines = [
        f"Ponder is serving {cfg.engine.model} at {url}/v1 (OpenAI-compatible).",
        "Try:",
        f"  curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'",
        '  ponder chat "What is 17 + 25?" --tier medium',
    ]
    if cfg.ray.dashboard:
        lines.append(
            f"Ray dashboard: http://127.0.0.1:{cfg.ray.dashboard_port} (it asks for Ray's token: "
            "`ray get-auth-token` prints it; it is also in ~/.ray/auth_token)"
        )
    lines.append("Ctrl-C stops the app and the Ray cluster.")
    return "\n".join(lines)


def cmd_chat(args: argparse.Namespace) -> int:
    from cluster.chat import chat

    return chat(args)


def cmd_status(args: argparse.Namespace) -> int:
    from cluster.status import main

    names = load_config(args.config).depth_control  # the actors' names and namespace
    try:
        print(main(args.address, args.json, names))
    except (ConnectionError, OSError) as exc:  # OSError: the TCP probe (refused, timed out, no route)
        raise CliError(f"no Ray cluster at {args.address!r}: {exc}") from exc
    return 0


def cmd_screenshots(args: argparse.Namespace) -> int:
    from cluster import dashboard

    token = dashboard.auth_token()
    try:
        apps = dashboard.serve_applications(args.dashboard, token)["applications"]
        if not apps:
            raise CliError(
                f"the Ray cluster behind {args.dashboard} serves no application: start `ponder serve`"
            )
        dashboard.screenshots(args.dashboard, Path(args.out), token, args.prometheus)
    except (dashboard.DashboardError, OSError) as exc:
        raise CliError(str(exc)) from exc
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from cluster import calibrate

    try:
        return calibrate.main(args)
    except calibrate.CalibrateError as exc:
        raise CliError(str(exc)) from exc


def command_plugins() -> list:
    """Subcommands other packages add to `ponder` (entry points of group `ponder.commands`, e.g.
    `bench = "bench.cli:register"` in pyproject.toml): the command line does not import the
    packages above it; they register themselves."""
    from importlib.metadata import entry_points

    return [ep.load() for ep in sorted(entry_points(group="ponder.commands"), key=lambda e: e.name)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ponder", description="Multi-round LLM reasoning on Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="start a local Ray cluster and serve the app")
    s.add_argument("--config", default=str(DEFAULT_CONFIG), help="app config YAML")
    s.add_argument("--host", help="HTTP bind address (overrides the config)")
    s.add_argument("--port", type=int, help="HTTP port (overrides the config)")
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("chat", help="ask a running Ponder server")
    c.add_argument("question")
    c.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    c.add_argument("--api-key", help="API key when the server wants one (better: $PONDER_API_KEY)")
    c.add_argument("--tier", choices=["low", "medium", "high", "critical"])
    c.add_argument("--max-rounds", type=int)
    c.add_argument("--min-rounds", type=int)
    c.add_argument("--temperature", type=float)
    c.add_argument("--max-tokens", type=int)
    c.add_argument("--stream", action="store_true", help="print rounds as they are generated")
    c.add_argument("--json", action="store_true", help="print the raw JSON response")
    c.set_defaults(func=cmd_chat)

    st = sub.add_parser("status", help="summary of a running cluster: nodes, workers, KV shards, budgets")
    st.add_argument("--address", default="auto", help="Ray cluster address (default: the local one)")
    st.add_argument("--json", action="store_true", help="print the raw JSON")
    st.add_argument("--config", default=str(DEFAULT_CONFIG), help="the app config it serves (actor names)")
    st.set_defaults(func=cmd_status)

    from cluster.models import add_models_parser

    add_models_parser(sub)
    from cluster.keys import add_keys_parser

    add_keys_parser(sub)
    from cluster.helm import add_helm_parser

    add_helm_parser(sub)

    for plugin in command_plugins():  # `ponder bench ...` (bench/cli.py) registers itself
        plugin(sub)

    sh = sub.add_parser(
        "screenshots", help="screenshot a running Ponder's Ray dashboard in headless chromium (docs/img)"
    )
    sh.add_argument("--dashboard", default="http://127.0.0.1:8265", help="Ray dashboard URL")
    sh.add_argument("--out", default="docs/img", help="folder for ray-dashboard-*.png")
    sh.add_argument(
        "--prometheus", help="a Prometheus scraping the cluster: adds its graph of Ponder's requests"
    )
    sh.set_defaults(func=cmd_screenshots)

    cal = sub.add_parser("calibrate", help="set a domain's confidence-exit threshold from warm-up problems")
    from cluster.calibrate import add_arguments as add_calibrate_arguments

    add_calibrate_arguments(cal)
    cal.set_defaults(func=cmd_calibrate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CliError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
