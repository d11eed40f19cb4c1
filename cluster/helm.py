"""The Helm chart's Python side (deploy/helm/ponder): its values schema follows the typed configs,
and the serveConfigV2 it renders must equal what the Serve builder makes of the same values.

- `$defs` of values.schema.json are generated from `AppConfig` and `TierTable`, so the chart refuses
  at `helm install` what `ponder serve` would refuse at start; `ponder helm schema` rewrites them
  and the tests fail while they are stale.
- `builder_args(values)` is what the chart passes to `services.app:app_builder`; `serve_config`
  is the Serve config the builder's application has. The chart's template mirrors both and the
  tests compare the rendered manifest with them.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from services.config import REPO_ROOT, AppConfig
from services.reasoning.tiers import TierTable

CHART_DIR = REPO_ROOT / "deploy" / "helm" / "ponder"
SCHEMA_FILE = CHART_DIR / "values.schema.json"
# Paths inside the pods that the chart owns (templates/_helpers.tpl uses the same ones).
API_KEYS_FILE = "/etc/ponder/api-keys/keys.yaml"
TIERS_FILE = "/etc/ponder/config/tiers.yaml"
CHAT_TEMPLATE_FILE = "/etc/ponder/config/chat_template.jinja"
IMAGE_CONFIGS = REPO_ROOT / "configs"  # both Dockerfiles copy it: relative file names resolve there


class HelmToolError(Exception):
    """A user-facing failure of `ponder helm`; the message says what to do."""


def schema_defs() -> dict[str, Any]:
    """JSON Schema definitions of the typed configs the chart carries (app, tiers)."""
    defs: dict[str, Any] = {}
    for model in (AppConfig, TierTable):
        schema = model.model_json_schema(ref_template="#/$defs/{model}")
        defs.update(schema.pop("$defs", {}))
        defs[model.__name__] = schema
    return dict(sorted(defs.items()))


def generated_schema(current: dict[str, Any]) -> dict[str, Any]:
    """`current` (the chart's hand-written part) with its `$defs` regenerated."""
    return {**current, "$defs": schema_defs()}


def load_schema(path: Path = SCHEMA_FILE) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def write_schema(path: Path = SCHEMA_FILE) -> bool:
    """Regenerate the `$defs`; True when the file changed."""
    current = load_schema(path)
    new = generated_schema(current)
    if new == current:
        return False
    path.write_text(json.dumps(new, indent=2) + "\n", encoding="utf-8")
    return True


def builder_args(values: dict[str, Any]) -> dict[str, Any]:
    """The args serveConfigV2 gives `services.app:app_builder` for the chart's merged values."""
    app = copy.deepcopy(values["app"])
    keys = values.get("apiKeys") or {}
    if keys.get("existingSecret") or keys.get("keys"):
        app.setdefault("auth", {})["api_keys_file"] = API_KEYS_FILE
    if values.get("tiers") is not None:
        app.setdefault("depth_control", {})["tiers_file"] = TIERS_FILE
    if values.get("chatTemplate"):
        app.setdefault("engine", {})["chat_template"] = CHAT_TEMPLATE_FILE
    return {"app": app}


def image_files(cfg: AppConfig) -> list[tuple[str, str]]:
    """(field, file) of the config's files that resolve in the image's configs/ (relative names)."""
    files = [
        ("depth_control.tiers_file", cfg.depth_control.tiers_file),
        ("depth_control.domains_file", cfg.depth_control.domains_file),
        ("router.complexity_file", cfg.router.complexity_file),
        ("router.prompts_file", cfg.router.prompts_file),
        ("engine.chat_template", cfg.engine.chat_template),
    ]
    return [(field, f) for field, f in files if f and not Path(f).is_absolute()]


def check_image_files(cfg: AppConfig) -> None:
    """A relative file the pods would not find fails here, as `from_dict` would fail in the pod."""
    for field, f in image_files(cfg):
        if not (IMAGE_CONFIGS / f).is_file():
            template = field == "engine.chat_template"
            hint = " (or set chatTemplate in the values to ship one)" if template else ""
            raise HelmToolError(f"app.{field}: {f} is not in the image's configs/ folder{hint}")


def serve_config(values: dict[str, Any]) -> dict[str, Any]:
    """What the chart's serveConfigV2 must say for these (merged) values; HelmToolError when a file
    the app names would not be found in the pods."""
    from services.app import serve_config as app_serve_config

    args = builder_args(values)
    cfg = AppConfig.model_validate(args["app"])
    check_image_files(cfg)
    return app_serve_config(cfg, args)


def merged_values(value_files: list[Path]) -> dict[str, Any]:
    """The chart's defaults coalesced with the files, as `helm install -f` would (Helm's own code)."""
    try:
        import helm_python
    except ImportError as e:
        raise HelmToolError("`ponder helm` needs helm-python-sdk (pip install helm-python-sdk)") from e
    overrides: dict[str, Any] = {}
    chart = helm_python.Chart.load(CHART_DIR)
    for f in value_files:
        try:
            data = yaml.safe_load(Path(f).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise HelmToolError(f"{f}: {e}") from e
        if not isinstance(data, dict):
            raise HelmToolError(f"{f}: a values file must be a mapping")
        overrides = _deep_merge(overrides, data)
    try:  # coalesced with the defaults (null deletes a default) and checked, as at install
        chart.validate_schema(overrides)
    except helm_python.HelmValuesError as e:
        raise HelmToolError(f"values rejected by values.schema.json: {e}") from e
    return chart.merge_values(overrides)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Later -f files win over earlier ones key by key, as in Helm."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def add_helm_parser(sub: Any) -> None:
    h = sub.add_parser("helm", help="the Helm chart's values schema and serveConfigV2")
    hsub = h.add_subparsers(dest="helm", required=True)
    s = hsub.add_parser("schema", help="regenerate values.schema.json's $defs from the typed configs")
    s.add_argument("--check", action="store_true", help="exit 1 if the file is stale, change nothing")
    c = hsub.add_parser("serve-config", help="print the serveConfigV2 the chart renders for these values")
    c.add_argument("-f", "--values", type=Path, action="append", default=[], help="values file (repeatable)")
    h.set_defaults(func=cmd_helm)


def cmd_helm(args: argparse.Namespace) -> int:
    try:
        if args.helm == "schema":
            return _schema(args.check)
        print(yaml.safe_dump(serve_config(merged_values(args.values)), sort_keys=False), end="")
        return 0
    except HelmToolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # pydantic's ValidationError: the app section does not validate
        print(f"error: app config rejected: {e}", file=sys.stderr)
        return 1


def _schema(check: bool) -> int:
    if check:
        stale = generated_schema(load_schema()) != load_schema()
        print(f"{SCHEMA_FILE}: {'stale: run `ponder helm schema`' if stale else 'up to date'}")
        return 1 if stale else 0
    changed = write_schema()
    print(f"{SCHEMA_FILE}: {'rewritten' if changed else 'already up to date'}")
    return 0
