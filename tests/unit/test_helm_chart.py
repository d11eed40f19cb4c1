"""The Helm chart (deploy/helm/ponder), offline: lint, render, Kubernetes and KubeRay schemas,
values.schema.json refusals, and serveConfigV2 == what the Serve builder makes of the same config.

Helm runs in-process (helm-python-sdk: Helm's Go SDK, no binary, no cluster); built-in kinds are
checked with kubernetes-validate's bundled schemas; the RayService against KubeRay's CRD from
shared/third_party/kuberay-crds (or $PONDER_KUBERAY_CRDS)."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from cluster import helm as chart_py
from services.config import REPO_ROOT, AppConfig
from services.reasoning.tiers import TierTable

CHART = chart_py.CHART_DIR
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
KUBE_VERSION = "1.31.0"  # the oldest minor a chart user is likely on; Chart.yaml allows >=1.25


def _crd_dir() -> Path:
    env = os.environ.get("PONDER_KUBERAY_CRDS")
    path = Path(env) if env else REPO_ROOT.parent / "shared" / "third_party" / "kuberay-crds"
    assert (path / "ray.io_rayservices.yaml").is_file(), (
        f"KubeRay CRDs not found in {path}: "
        "set PONDER_KUBERAY_CRDS to a folder holding ray.io_rayservices.yaml"
    )
    return path


def _strict(schema: object) -> object:
    """As `kubectl apply --validate=strict`: an object schema with properties takes no others."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def rayservice_validator() -> jsonschema.protocols.Validator:
    crd = yaml.safe_load((_crd_dir() / "ray.io_rayservices.yaml").read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(_strict(v1["schema"]["openAPIV3Schema"]))


@pytest.fixture(scope="module")
def chart() -> helm.Chart:
    return helm.Chart.load(CHART)


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _render(chart: helm.Chart, values: dict) -> dict[str, list[dict]]:
    """Rendered objects by kind (NOTES.txt left out)."""
    out: dict[str, list[dict]] = {}
    for name, text in chart.render(values, name="ponder", namespace="ai").items():
        if name.endswith(".yaml"):
            for doc in yaml.safe_load_all(text):
                if doc:
                    out.setdefault(doc["kind"], []).append(doc)
    return out


VALUE_SETS = {
    "defaults": {},
    **{p.stem: _load(p) for p in EXAMPLES},
    "store-off": {"app": {"kvstore": {"enabled": False}, "router": {"num_replicas": 3}}},
    "no-affinity": {"app": {"kvstore": {"affinity": False}, "http": {"port": 9000}}},
    # Sections left to AppConfig's defaults: the template's defaults must be the same.
    "app-defaults": {
        "app": {"router": None, "ray": None, "worker": {"max_ongoing_requests": None, "num_cpus": None}}
    },
}


def test_examples_exist():
    assert {p.stem for p in EXAMPLES} >= {"multi-gpu-nodes", "cpu", "thinking-cpu"}


@pytest.mark.parametrize("name", ["defaults", *[p.stem for p in EXAMPLES]])
def test_chart_lints_strict_without_findings(name):
    report = helm.lint(CHART, VALUE_SETS[name], strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == [] and report["messages"] == [], report


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_every_rendered_object_validates(chart, rayservice_validator, name):
    objects = _render(chart, VALUE_SETS[name])
    assert len(objects["RayService"]) == 1
    for kind, docs in objects.items():
        for doc in docs:
            if kind == "RayService":
                errors = [e.message for e in rayservice_validator.iter_errors(doc)]
                assert errors == [], errors
                for template in _pod_templates(doc):  # the pods, as Kubernetes itself checks them
                    kubernetes_validate.validate(
                        {
                            "apiVersion": "v1",
                            "kind": "PodTemplate",
                            "metadata": {"name": "t"},
                            "template": template,
                        },
                        KUBE_VERSION,
                        strict=True,
                    )
            elif kind in ("PodMonitor", "PrometheusRule"):  # operator CRDs: not bundled; shapes checked below
                assert doc["apiVersion"] == "monitoring.coreos.com/v1"
            else:
                kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def _pod_templates(rayservice: dict) -> list[dict]:
    rc = rayservice["spec"]["rayClusterConfig"]
    return [rc["headGroupSpec"]["template"]] + [g["template"] for g in rc["workerGroupSpecs"]]


def test_validation_catches_typos(rayservice_validator):
    """The checks above can fail: a misspelt field is refused by both validators."""
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "dta": {}},
            KUBE_VERSION,
            strict=True,
        )
    bad = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "spec": {"rayClusterConfig": {"headGroupSpec": {}}},
    }
    assert list(rayservice_validator.iter_errors(bad))  # headGroupSpec.template is required
    bad = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "spec": {"serveConfigV3": "", "rayClusterConfig": {}},
    }
    assert any("serveConfigV3" in e.message for e in rayservice_validator.iter_errors(bad))


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_serve_config_equals_what_the_builder_makes(chart, name):
    (rs,) = _render(chart, VALUE_SETS[name])["RayService"]
    rendered = yaml.safe_load(rs["spec"]["serveConfigV2"])
    assert rendered == chart_py.serve_config(chart.merge_values(VALUE_SETS[name]))


def test_serve_config_follows_the_typed_config(chart):
    """Not a copy: the replicas, GPUs and router class come from the app section."""
    (rs,) = _render(chart, VALUE_SETS["multi-gpu-nodes"])["RayService"]
    app = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]
    worker, router = app["deployments"]
    assert (worker["name"], worker["num_replicas"], worker["ray_actor_options"]) == (
        "ReasoningWorker",
        16,
        {"num_cpus": 6, "num_gpus": 1},
    )
    routing = worker["request_router_config"]["request_router_class"]
    assert routing == "services.worker.affinity:SessionAffinityRouter"
    assert (router["name"], router["num_replicas"]) == ("Router", 4)
    (rs,) = _render(chart, VALUE_SETS["no-affinity"])["RayService"]
    app = yaml.safe_load(rs["spec"]["serveConfigV2"])
    assert "request_router_config" not in app["applications"][0]["deployments"][0]
    assert app["http_options"]["port"] == 9000


@pytest.mark.parametrize("name", ["defaults", "cpu"])
def test_the_cluster_entry_point_builds_the_rendered_deployments(chart, name):
    """KubeRay calls services.app:app_builder with the rendered args: it must accept them and build
    exactly the deployments the manifest lists (the model resolves from the local catalog)."""
    from ray.serve._private.build_app import build_app as build_deployments
    from ray.serve.deployment import deployment_to_schema

    from services.app import app_builder

    (rs,) = _render(chart, VALUE_SETS[name])["RayService"]
    (app,) = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"]
    built = build_deployments(app_builder(app["args"]), name=app["name"])
    made = [deployment_to_schema(d).model_dump(mode="json", exclude_unset=True) for d in built.deployments]
    assert made == app["deployments"]


def test_app_builder_refuses_unknown_args():
    from services.app import app_builder

    with pytest.raises(ValueError, match="`config`"):
        app_builder({"app": {}, "config": "x.yaml"})
    with pytest.raises(ValueError, match="cfg"):
        app_builder({"cfg": {}})


def test_values_schema_defs_are_generated_from_the_typed_configs():
    current = chart_py.load_schema()
    assert current == chart_py.generated_schema(current), "stale: run `ponder helm schema`"
    assert current["properties"]["app"] == {"$ref": "#/$defs/AppConfig"}
    assert set(current["$defs"]) >= {"AppConfig", "EngineConfig", "KvStoreConfig", "TierTable", "Tier"}


def test_default_app_section_is_a_valid_app_config(chart):
    app = chart.merge_values({})["app"]
    cfg = AppConfig.model_validate(app)
    assert cfg.kvstore.enabled and cfg.engine.block_size == 16 and cfg.worker.num_gpus == 1


REFUSED = [
    (
        "negative GPUs per pod",
        {"workerGroups": [{**_load(CHART / "values.yaml")["workerGroups"][0], "gpus": -1}]},
        "/workerGroups/0/gpus",
    ),
    ("negative GPUs per engine", {"app": {"worker": {"num_gpus": -1}}}, "/app/worker/num_gpus"),
    (
        "GPU engines without GPU nodes",
        {"workerGroups": [{**_load(CHART / "values.yaml")["workerGroups"][0], "gpus": 0}]},
        "/workerGroups",
    ),
    (
        "unknown tier in the tier table",
        {
            "tiers": {
                "default_tier": "medium",
                "tiers": {"extreme": {"min_rounds": 1, "max_rounds": 2, "confidence_threshold": 0.5}},
            }
        },
        "extreme",
    ),
    (
        "unknown default tier",
        {
            "tiers": {
                **yaml.safe_load((REPO_ROOT / "configs/tiers.yaml").read_text()),
                "default_tier": "urgent",
            }
        },
        "/tiers",
    ),
    (
        "unknown tier for a key",
        {"apiKeys": {"keys": [{"name": "a", "sha256": "0" * 64, "tiers": ["gold"]}]}},
        "/apiKeys/keys/0/tiers/0",
    ),
    ("missing model", {"app": {"engine": {"model": None}}}, "missing property 'model'"),
    ("empty model", {"app": {"engine": {"model": ""}}}, "/app/engine/model"),
    ("no pull and no model folder", {"model": {"pull": False}}, "model_path"),
    ("store without block size", {"app": {"engine": {"block_size": None}}}, "block_size"),
    ("misspelt app field", {"app": {"kvstore": {"ram_byte": 1}}}, "ram_byte"),
    ("misspelt chart field", {"workerGroup": []}, "workerGroup"),
    ("unknown transport", {"network": {"transport": "carrier-pigeon"}}, "/network/transport"),
    (
        "raw key instead of a hash",
        {"apiKeys": {"keys": [{"name": "a", "sha256": "pk-secret"}]}},
        "/apiKeys/keys/0/sha256",
    ),
    (
        "two volume sources",
        {"model": {"volume": {"emptyDir": {}, "hostPath": {"path": "/m"}}}},
        "/model/volume",
    ),
]


@pytest.mark.parametrize(("case", "values", "where"), REFUSED, ids=[r[0] for r in REFUSED])
def test_invalid_values_are_refused_with_a_clear_message(chart, case, values, where):
    with pytest.raises(helm.HelmValuesError) as err:
        chart.render(values, name="ponder", namespace="ai")
    assert "values don't meet the specifications" in str(err.value)
    assert where in str(err.value), str(err.value)


def _head_and_workers(objects: dict) -> tuple[dict, list[dict]]:
    rc = objects["RayService"][0]["spec"]["rayClusterConfig"]
    return rc["headGroupSpec"], rc["workerGroupSpecs"]


def _container(group: dict) -> dict:
    (c,) = group["template"]["spec"]["containers"]
    return c


def test_pods_reserve_the_kv_shard_and_the_gpus(chart):
    values = VALUE_SETS["multi-gpu-nodes"]
    head, workers = _head_and_workers(_render(chart, values))
    ram_mi = values["app"]["kvstore"]["ram_bytes"] // (1 << 20)
    for spec, group in zip(workers, values["workerGroups"], strict=True):
        res = _container(spec)["resources"]
        assert res["requests"] == res["limits"]
        assert res["limits"]["memory"] == f"{(group['memoryGiB'] + group['shmGiB']) * 1024 + ram_mi}Mi"
        assert res["limits"]["cpu"] == str(group["cpus"] + 1)  # + the shard's NIXL progress core
        assert res["limits"]["nvidia.com/gpu"] == "8"
        assert res["limits"]["rdma/rdma_shared_device_a"] == "1"
        assert _container(spec)["securityContext"]["capabilities"]["add"] == ["IPC_LOCK"]
        assert spec["rayStartParams"]["num-cpus"] == str(group["cpus"])  # Ray never schedules on that core
        shm = [v for v in spec["template"]["spec"]["volumes"] if v["name"] == "shm"][0]
        assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": f"{group['shmGiB']}Gi"}
    head_res = _container(head)["resources"]["limits"]
    assert "nvidia.com/gpu" not in head_res
    cpu_head, _ = _head_and_workers(_render(chart, VALUE_SETS["cpu"]))
    assert _container(cpu_head)["resources"]["limits"]["cpu"] == "2"  # transport ray: no progress core


def test_network_values_reach_every_ray_container(chart):
    head, workers = _head_and_workers(_render(chart, VALUE_SETS["multi-gpu-nodes"]))
    for group in [head, *workers]:
        env = {e["name"]: e["value"] for e in _container(group)["env"]}
        assert env["UCX_TLS"].startswith("rc,")
        assert env["UCX_NET_DEVICES"] == "mlx5_0:1,mlx5_1:1"
        assert env["NCCL_IB_HCA"] == "mlx5_0,mlx5_1"
        assert env["PONDER_HOME"] == "/var/lib/ponder"
    roce = {"network": {"transport": "roce", "gidIndex": 3}}
    head, _ = _head_and_workers(_render(chart, roce))
    env = {e["name"]: e["value"] for e in _container(head)["env"]}
    assert env["UCX_IB_GID_INDEX"] == "3" and "ud" not in env["UCX_TLS"].split(",")
    head, _ = _head_and_workers(_render(chart, {}))
    assert {e["name"]: e["value"] for e in _container(head)["env"]}["UCX_TLS"] == "tcp,sm,self"


def test_api_keys_secret_holds_hashes_at_the_path_the_app_reads(chart):
    values = VALUE_SETS["multi-gpu-nodes"]
    objects = _render(chart, values)
    (secret,) = objects["Secret"]
    assert yaml.safe_load(secret["stringData"]["keys.yaml"]) == {"keys": values["apiKeys"]["keys"]}
    head, _ = _head_and_workers(objects)
    mount = [m for m in _container(head)["volumeMounts"] if m["name"] == "api-keys"][0]
    assert f"{mount['mountPath']}/keys.yaml" == chart_py.API_KEYS_FILE
    app = yaml.safe_load(objects["RayService"][0]["spec"]["serveConfigV2"])["applications"][0]
    assert app["args"]["app"]["auth"]["api_keys_file"] == chart_py.API_KEYS_FILE
    # A Secret made elsewhere is mounted, not created.
    objects = _render(chart, {"apiKeys": {"existingSecret": "my-keys"}})
    assert "Secret" not in objects
    head, _ = _head_and_workers(objects)
    vol = [v for v in head["template"]["spec"]["volumes"] if v["name"] == "api-keys"][0]
    assert vol["secret"]["secretName"] == "my-keys"


def test_tier_table_configmap_is_a_valid_table_at_the_path_the_app_reads(chart):
    objects = _render(chart, VALUE_SETS["multi-gpu-nodes"])
    (cm,) = [c for c in objects["ConfigMap"] if c["metadata"]["name"].endswith("-config")]
    table = TierTable.model_validate(yaml.safe_load(cm["data"]["tiers.yaml"]))
    assert table.tiers["critical"].review and table.tiers["high"].strategy == "tot"
    head, workers = _head_and_workers(objects)
    for group in [head, *workers]:
        mount = [m for m in _container(group)["volumeMounts"] if m["name"] == "config"][0]
        assert f"{mount['mountPath']}/tiers.yaml" == chart_py.TIERS_FILE
        assert "ponder.io/tiers-checksum" in group["template"]["metadata"]["annotations"]


def test_a_chat_template_in_the_values_is_mounted_and_served(chart):
    """chatTemplate ships a template the image lacks: the ConfigMap holds it, every pod mounts it
    where app.engine.chat_template points, and a change rolls the cluster."""
    template = (REPO_ROOT / "configs/templates/chatml-think.jinja").read_text()
    values = {**VALUE_SETS["thinking-cpu"], "chatTemplate": template}
    objects = _render(chart, values)
    (cm,) = [c for c in objects["ConfigMap"] if c["metadata"]["name"].endswith("-config")]
    assert cm["data"]["chat_template.jinja"].strip() == template.strip() and "tiers.yaml" not in cm["data"]
    head, workers = _head_and_workers(objects)
    for group in [head, *workers]:
        mount = [m for m in _container(group)["volumeMounts"] if m["name"] == "config"][0]
        assert f"{mount['mountPath']}/chat_template.jinja" == chart_py.CHAT_TEMPLATE_FILE
        assert "ponder.io/chat-template-checksum" in group["template"]["metadata"]["annotations"]
    app = yaml.safe_load(objects["RayService"][0]["spec"]["serveConfigV2"])["applications"][0]
    assert app["args"]["app"]["engine"]["chat_template"] == chart_py.CHAT_TEMPLATE_FILE
    assert app == chart_py.serve_config(chart.merge_values(values))["applications"][0]


def test_a_file_the_image_does_not_ship_is_refused_before_install(chart):
    """A relative file name resolves in the image's configs/: one that is not there fails at
    `ponder helm serve-config`, not later in a pod."""
    values = {"app": {"engine": {"chat_template": "templates/mine.jinja"}}}
    refused = "engine.chat_template: templates/mine.jinja.*chatTemplate"
    with pytest.raises(chart_py.HelmToolError, match=refused):
        chart_py.serve_config(chart.merge_values(values))
    values = {"app": {"depth_control": {"tiers_file": "tiers-typo.yaml"}}}
    with pytest.raises(chart_py.HelmToolError, match="depth_control.tiers_file"):
        chart_py.serve_config(chart.merge_values(values))


def test_dashboard_configmap_is_the_dashboard_file(chart):
    (cm,) = [c for c in _render(chart, {})["ConfigMap"] if c["metadata"]["name"].endswith("-dashboard")]
    on_disk = json.loads((CHART / "dashboards" / "ponder-dashboard.json").read_text())
    assert json.loads(cm["data"]["ponder-dashboard.json"]) == on_disk
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_network_policy_opens_only_the_api_to_everyone(chart):
    (np,) = _render(chart, {})["NetworkPolicy"]
    open_rules = [r for r in np["spec"]["ingress"] if "from" not in r]
    assert open_rules == [{"ports": [{"port": 8000, "protocol": "TCP"}]}]
    assert np["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == "ponder"
    (rs,) = _render(chart, {})["RayService"]
    assert rs["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}
    assert "NetworkPolicy" not in _render(chart, {"security": {"networkPolicy": False}})


def test_optional_objects_follow_their_switches(chart):
    defaults = _render(chart, {})
    assert (
        "PodMonitor" not in defaults and "Ingress" not in defaults and "PersistentVolumeClaim" not in defaults
    )
    assert "PrometheusRule" not in defaults
    objects = _render(chart, VALUE_SETS["multi-gpu-nodes"])
    (pm,) = objects["PodMonitor"]
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert pm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (rule,) = objects["PrometheusRule"]  # the promtool-tested rule file, as it is (tests/unit/test_alerts.py)
    assert rule["spec"] == yaml.safe_load((CHART / "alerts" / "ponder-rules.yaml").read_text())
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert "{{ $labels.tier }}" in rule["spec"]["groups"][0]["rules"][0]["annotations"]["summary"]
    (ing,) = objects["Ingress"]
    backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == objects["RayService"][0]["spec"]["serveService"]["metadata"]["name"]
    (pvc,) = objects["PersistentVolumeClaim"]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    (pdb,) = objects["PodDisruptionBudget"]
    assert pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "ray-worker"
    _, workers = _head_and_workers(objects)
    vols = {v["name"]: v for v in workers[0]["template"]["spec"]["volumes"]}
    assert vols["kv-disk"]["hostPath"]["path"] == "/mnt/nvme0/ponder-kv"
    assert vols["models"] == {
        "name": "models",
        "persistentVolumeClaim": {"claimName": "models", "readOnly": True},
    }
    assert "initContainers" not in workers[0]["template"]["spec"]  # the model is on the volume


def test_model_pull_runs_before_ray_on_every_pod(chart):
    head, workers = _head_and_workers(_render(chart, {}))
    for group in [head, *workers]:
        (init,) = group["template"]["spec"]["initContainers"]
        assert init["command"] == ["ponder", "models", "pull", "smollm2-135m-instruct"]


def test_serve_config_cli(tmp_path, capsys):
    from cluster.cli import main

    assert main(["helm", "serve-config", "-f", str(CHART / "examples" / "cpu.yaml")]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["applications"][0]["deployments"][0]["num_replicas"] == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"workerGroups": [{"name": "g", "gpus": -1}]}))
    assert main(["helm", "serve-config", "-f", str(bad)]) == 1
    assert "values.schema.json" in capsys.readouterr().err
    assert main(["helm", "serve-config", "-f", str(tmp_path / "missing.yaml")]) == 1
    assert "missing.yaml" in capsys.readouterr().err
    assert main(["helm", "schema", "--check"]) == 0


def test_schema_check_notices_a_stale_file(tmp_path):
    stale = copy.deepcopy(chart_py.load_schema())
    stale["$defs"]["WorkerConfig"]["properties"].pop("num_gpus")
    path = tmp_path / "values.schema.json"
    path.write_text(json.dumps(stale))
    assert chart_py.write_schema(path) is True
    assert chart_py.load_schema(path) == chart_py.load_schema()
    assert chart_py.write_schema(path) is False
