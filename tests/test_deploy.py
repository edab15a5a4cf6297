"""deploy/ is checked without a cluster, a container engine or a browser.

Kubernetes manifests against the API schemas (kubernetes-validate) and against each other;
the kustomize overlay rendered by a small renderer (cross-checked with `kubectl kustomize`
where that exists); Prometheus rules with promtool; every metric and label that rules and
dashboard use against PRODUCT.md's list and the proxy's own registry; the Dockerfile and the
compose file statically; the shipped routes.yaml files with the real config loader.
promtool and the config loader are required when CI=true, skipped (with the reason) elsewhere.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from shadowproxy.config.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
BASE = K8S / "base"
OVERLAY = K8S / "overlays" / "production"
KUBE_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
IN_CI = os.environ.get("CI") == "true"

Doc = dict[str, Any]


def require(available: bool, what: str) -> None:
    """Skip locally without `what`; in CI its absence is a failure, never a skip."""
    if available:
        return
    if IN_CI:
        pytest.fail(f"{what} is required when CI=true")
    pytest.skip(f"{what} is not available here")


def load_all(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


# --- a kustomize subset: resources, components, namespace, images, replicas, patches ---------

# x-kubernetes-patch-merge-key of the lists our patches touch; any other list of objects is
# refused rather than merged wrongly.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "topologySpreadConstraints": "topologyKey",
}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}


def merge_patch(target: Any, patch: Any, key: str = "") -> Any:
    if isinstance(target, dict) and isinstance(patch, dict):
        assert "$patch" not in patch, "renderer does not support $patch directives"
        merged = dict(target)
        for k, v in patch.items():
            merged[k] = merge_patch(target[k], v, k) if k in target else copy.deepcopy(v)
        return merged
    if isinstance(patch, list) and any(isinstance(item, dict) for item in patch):
        assert key in MERGE_KEYS, f"renderer has no merge key for list {key!r}"
        # As kubectl does: the patch's new items first, then the target's, merged by key.
        merge_key = MERGE_KEYS[key]
        patches = {item[merge_key]: item for item in patch}
        existing = {item[merge_key] for item in target}
        added = [copy.deepcopy(item) for item in patch if item[merge_key] not in existing]
        kept = [
            merge_patch(t, patches[t[merge_key]]) if t[merge_key] in patches else t for t in target
        ]
        return added + kept
    return copy.deepcopy(patch)


def pod_containers(doc: Doc) -> list[Doc]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def kustomize(directory: Path) -> list[Doc]:
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    supported = {"apiVersion", "kind", "resources", "components", "namespace", "images"}
    unsupported = set(k) - supported - {"replicas", "patches"}
    assert not unsupported, f"{directory}: renderer does not support {unsupported}"
    docs: list[Doc] = []
    for entry in [*k.get("resources", []), *k.get("components", [])]:
        path = directory / entry
        docs += kustomize(path) if path.is_dir() else load_all(path)
    for patch_entry in k.get("patches", []):
        assert set(patch_entry) == {"path"}, "only `patches: [{path: ...}]` is supported"
        patch = yaml.safe_load((directory / patch_entry["path"]).read_text())
        matches = [
            i
            for i, d in enumerate(docs)
            if (d["kind"], d["metadata"]["name"]) == (patch["kind"], patch["metadata"]["name"])
        ]
        assert len(matches) == 1, f"patch {patch_entry['path']} matches {len(matches)} resources"
        docs[matches[0]] = merge_patch(docs[matches[0]], patch)
    for doc in docs:
        if "namespace" in k and doc["kind"] not in CLUSTER_SCOPED:
            doc["metadata"]["namespace"] = k["namespace"]
        for container in pod_containers(doc):
            for image in k.get("images", []):
                name = re.split(r"[:@]", container["image"], maxsplit=1)[0]
                if name == image["name"]:
                    tag = image.get("newTag") or container["image"][len(name) + 1 :]
                    container["image"] = f"{image.get('newName', name)}:{tag}"
        for replicas in k.get("replicas", []):
            if doc["metadata"]["name"] == replicas["name"] and "replicas" in doc.get("spec", {}):
                doc["spec"]["replicas"] = replicas["count"]
    return docs


def by_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[Doc], kind: str) -> Doc:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


RENDERINGS = {"base": BASE, "production": OVERLAY}


@pytest.fixture(params=sorted(RENDERINGS))
def rendered(request: pytest.FixtureRequest) -> list[Doc]:
    return kustomize(RENDERINGS[request.param])


def test_renderer_agrees_with_kubectl_kustomize() -> None:
    kubectl = shutil.which("kubectl")
    require(kubectl is not None, "kubectl (to check the Python kustomize renderer against)")
    assert kubectl is not None
    for directory in RENDERINGS.values():
        out = subprocess.run(
            [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=30
        )
        assert out.returncode == 0, out.stderr
        theirs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out.stdout)}
        ours = {(d["kind"], d["metadata"]["name"]): d for d in kustomize(directory)}
        assert ours == theirs


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_manifests_validate_against_kubernetes_schemas(rendered: list[Doc], version: str) -> None:
    extra = load_all(BASE / "secret.example.yaml")
    for doc in [*rendered, *extra]:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: test_podmonitor_structure
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} on {version}: {str(exc)[:600]}")


def test_base_has_the_production_pieces() -> None:
    docs = kustomize(BASE)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "Deployment", "PodDisruptionBudget", "Service", "Service"]
    assert by_kind(docs, "Secret") == [], "a placeholder Secret must never be applied"
    assert one(docs, "Deployment")["spec"]["replicas"] == 2
    secret = one(load_all(BASE / "secret.example.yaml"), "Secret")
    assert all("CHANGE-ME" in value for value in secret["stringData"].values())


def routes_yaml(docs: list[Doc]) -> Doc:
    data: Doc = yaml.safe_load(one(docs, "ConfigMap")["data"]["routes.yaml"])
    return data


def test_deployment_matches_the_proxy(rendered: list[Doc]) -> None:
    deployment = one(rendered, "Deployment")
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    (container,) = spec["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    routes = routes_yaml(rendered)
    assert ports == {"http": routes["server"]["port"], "admin": routes["admin"]["port"]}
    assert routes["admin"]["host"] == "0.0.0.0", "probes and scrapes reach the pod IP"

    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert pod["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(ports["admin"]),
        "prometheus.io/path": "/metrics",
    }

    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = ServerSettings().shutdown_grace_s
    assert spec["terminationGracePeriodSeconds"] > int(pre_stop[1]) + drain

    env = {e["name"]: e for e in container["env"]}
    assert env["SHADOWPROXY_INSTANCE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    secret = one(load_all(BASE / "secret.example.yaml"), "Secret")
    for name in ("SHADOWPROXY_DATABASE_URL", "SHADOWPROXY_ADMIN_TOKEN"):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"]
        assert ref["key"] in secret["stringData"]
    assert routes["admin"]["token_env"] == "SHADOWPROXY_ADMIN_TOKEN"

    config_path = Path(env["SHADOWPROXY_CONFIG"]["value"])
    assert container["args"] == ["serve", "--config", str(config_path)]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    config_mount = mounts[str(config_path.parent)]
    assert "subPath" not in config_mount, "a subPath mount never sees ConfigMap updates"
    configmap = one(rendered, "ConfigMap")
    assert volumes[config_mount["name"]]["configMap"]["name"] == configmap["metadata"]["name"]
    assert config_path.name in configmap["data"]

    spool = mounts[routes["storage"]["spool_dir"]]
    assert "emptyDir" in volumes[spool["name"]]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == dockerfile_uid()
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]


def test_selectors_and_ports_line_up(rendered: list[Doc]) -> None:
    deployment = one(rendered, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    port_names = {
        p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
    }

    def selects(selector: dict[str, str]) -> bool:
        return bool(selector) and selector.items() <= labels.items()

    assert selects(deployment["spec"]["selector"]["matchLabels"])
    assert selects(one(rendered, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"])
    services = {s["metadata"]["name"]: s for s in by_kind(rendered, "Service")}
    assert {p["targetPort"] for p in services["shadowproxy"]["spec"]["ports"]} == {"http"}
    assert {p["targetPort"] for p in services["shadowproxy-admin"]["spec"]["ports"]} == {"admin"}
    for service in services.values():
        assert selects(service["spec"]["selector"])
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    for monitor in by_kind(rendered, "PodMonitor"):
        assert selects(monitor["spec"]["selector"]["matchLabels"])


def test_overlay_changes_what_it_says() -> None:
    docs = kustomize(OVERLAY)
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == (
        "registry.example.com/ml-platform/shadowproxy:0.1.0"
    )
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {
        "shadowproxy"
    }
    assert routes_yaml(docs) != routes_yaml(kustomize(BASE))
    assert len(by_kind(docs, "PodMonitor")) == 1


# The PodMonitor CRD's fields we may use (monitoring.coreos.com/v1); kubernetes-validate has no CRDs.
PODMONITOR_SPEC = {"selector", "namespaceSelector", "podMetricsEndpoints", "jobLabel",
                   "podTargetLabels", "sampleLimit", "targetLimit"}  # fmt: skip
PODMONITOR_ENDPOINT = {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels",
                       "relabelings", "metricRelabelings", "params"}  # fmt: skip
DURATION = re.compile(r"^(\d+(ms|s|m|h))+$")


def test_podmonitor_structure() -> None:
    docs = kustomize(OVERLAY)
    monitor = one(docs, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(monitor["spec"]) <= PODMONITOR_SPEC
    assert set(monitor["spec"]["selector"]) <= {"matchLabels", "matchExpressions"}
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert set(endpoint) <= PODMONITOR_ENDPOINT
    assert endpoint["port"] == "admin" and endpoint["path"] == "/metrics"
    assert "admin" in {p["name"] for p in container["ports"]}
    assert DURATION.match(endpoint["interval"]) and DURATION.match(endpoint["scrapeTimeout"])


# --- the shipped routes.yaml files and the real config loader ---------------------------------


def shipped_routes() -> dict[str, str]:
    return {
        "base ConfigMap": one(kustomize(BASE), "ConfigMap")["data"]["routes.yaml"],
        "production ConfigMap": one(kustomize(OVERLAY), "ConfigMap")["data"]["routes.yaml"],
        "compose": (DEPLOY / "compose" / "routes.yaml").read_text(),
    }


@pytest.mark.parametrize("name", sorted(shipped_routes()))
def test_shipped_routes_yaml_is_valid(name: str, tmp_path: Path) -> None:
    try:
        from shadowproxy.config.load import load_settings
    except ImportError as exc:
        require(False, f"shadowproxy.config.load.load_settings ({exc})")
    path = tmp_path / "routes.yaml"
    path.write_text(shipped_routes()[name])
    settings = load_settings(str(path))
    assert settings.admin.host == "0.0.0.0"
    assert settings.storage.spool_dir == "/var/lib/shadowproxy/spool"
    assert settings.routes and settings.routes[0].shadows


# --- Dockerfile --------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuations joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        instructions.append((word.upper(), rest.strip()))
        pending = ""
    assert not pending, "Dockerfile ends inside a continuation"
    return instructions


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def dockerfile_uid() -> int:
    users = [args for word, args in final_stage() if word == "USER"]
    return int(users[-1].split(":")[0])


def test_dockerfile_essentials() -> None:
    instructions = dockerfile()
    froms = [args for word, args in instructions if word == "FROM"]
    assert len(froms) >= 2, "multi-stage: build the wheel, then a slim runtime"
    stages = {args.split(" AS ")[-1] for args in froms if " AS " in args}
    stage = dict(final_stage())
    assert "slim" in froms[-1]
    assert dockerfile_uid() != 0, "the runtime runs as a non-root user"
    assert json.loads(stage["ENTRYPOINT"]) == ["shadowproxy"]
    assert json.loads(stage["CMD"]) == ["serve", "--config", "/etc/shadowproxy/routes.yaml"]
    assert set(stage["EXPOSE"].split()) == {"8080", "9901"}
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "shadowproxy" in scripts

    runtime_steps = " ".join(args for word, args in final_stage() if word in {"COPY", "RUN"})
    copied_from = set(re.findall(r"from=(\w+)", runtime_steps))
    assert copied_from and copied_from <= stages, "the runtime takes the build stage's wheels"
    assert "pip install --no-index" in runtime_steps

    health = stage["HEALTHCHECK"]
    exec_form = json.loads(health[health.index("CMD") + 3 :])
    assert exec_form[:2] == ["python", "-c"], "slim images have no curl: use the stdlib"
    compile(exec_form[2], "HEALTHCHECK", "exec")
    assert "127.0.0.1:9901/healthz" in exec_form[2]


def test_dockerfile_copies_what_the_context_lets_in() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore, "the context is an allow-list"
    for word, args in dockerfile():
        if word != "COPY" or "--from=" in args:
            continue
        *sources, _dest = args.split()
        for source in sources:
            assert source.rstrip("/") in allowed, f"{source} is excluded from the context"
            assert (ROOT / source).exists(), f"COPY {source}: missing in the repository"


# --- docker-compose.yml ------------------------------------------------------------------------


def compose() -> Doc:
    data: Doc = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    return data


def test_compose_references_existing_files() -> None:
    services = compose()["services"]
    assert {"postgres", "prometheus", "grafana", "model-primary", "model-candidate"} <= set(
        services
    )
    for name, service in services.items():
        build = service.get("build")
        if build:
            context = DEPLOY / build["context"]
            assert (context / build["dockerfile"]).is_file(), name
        else:
            assert ":" in service["image"] and not service["image"].endswith(":latest"), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on unknown {dependency}"


def test_compose_wires_proxies_models_and_monitoring() -> None:
    services = compose()["services"]
    proxies = {n: s for n, s in services.items() if s.get("command", [None])[0] == "serve"}
    assert len(proxies) == 2, "two replicas on one database and one routes.yaml"
    routes = yaml.safe_load((DEPLOY / "compose" / "routes.yaml").read_text())
    for service in proxies.values():
        assert {
            "SHADOWPROXY_DATABASE_URL",
            "SHADOWPROXY_ADMIN_TOKEN",
            "SHADOWPROXY_INSTANCE",
        } <= set(service["environment"])
        assert service["environment"]["SHADOWPROXY_DATABASE_URL"].startswith("postgresql://")
    hosts = {u["url"].split("//")[1].split(":")[0] for u in routes["upstreams"].values()}
    assert hosts == {"model-primary", "model-candidate"}
    for role in ("primary", "candidate"):
        model = services[f"model-{role}"]
        assert model["entrypoint"] == ["python", "-m", "shadowproxy.demo.models"]
        assert model["command"][:2] == ["--role", role]
        port = model["command"][model["command"].index("--port") + 1]
        assert f"127.0.0.1:{port}/healthz" in " ".join(model["healthcheck"]["test"])

    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    mounts = dict(v.split(":")[1::-1] for v in services["prometheus"]["volumes"])
    assert all(rule in mounts for rule in prometheus["rule_files"])
    targets = prometheus["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == [f"{n}:{routes['admin']['port']}" for n in sorted(proxies)]


def test_demo_models_accept_the_compose_arguments() -> None:
    try:
        import shadowproxy.demo.models  # noqa: F401
    except ImportError as exc:
        require(False, f"shadowproxy.demo.models ({exc})")
    out = subprocess.run(
        [sys.executable, "-m", "shadowproxy.demo.models", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    for flag in ("--role", "--host", "--port"):
        assert flag in out.stdout
