"""The Helm chart, rendered by the real helm binary (installed from PyPI by dsaforge.deploy.helm) and checked field
by field; every manifest is validated strictly against the Kubernetes schemas."""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
import yaml

from dsaforge.config import load_config
from dsaforge.deploy import helm as chart

CHART = chart.CHART
SANDBOX = {"synthesize", "grpo", "evaluate"}
WORKLOADS = {"Deployment", "StatefulSet", "Job"}


@pytest.fixture(scope="session")
def helm() -> Path:
    return chart.install_helm()


@pytest.fixture(scope="session")
def rendered(helm) -> dict[str, list[dict]]:
    return {variant: chart.render(helm, [values] if values else []) for variant, values in chart.CI_VALUES.items()}


def by_kind(docs, kind):
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_specs(docs):
    """(name, kind, pod spec) of every workload and stage PodTemplate."""
    for d in docs:
        if d["kind"] in WORKLOADS:
            yield d["metadata"]["name"], d["kind"], d["spec"]["template"]["spec"]
        elif d["kind"] == "PodTemplate":
            yield d["metadata"]["name"], d["kind"], d["template"]["spec"]


def containers(spec):
    return spec.get("initContainers", []) + spec["containers"]


def test_lint_strict_and_kubernetes_schemas(helm, rendered):
    for variant, values in chart.CI_VALUES.items():
        chart.lint(helm, values=[values] if values else [])
        chart.validate(rendered[variant])
    assert len(rendered["default"]) > 20
    oldest, newest = (tuple(map(int, v.split("."))) for v in chart.kube_versions())
    assert oldest == (1, 31) and newest >= (1, 35)


def test_validation_catches_an_unknown_field(rendered):
    doc = json.loads(json.dumps(by_kind(rendered["default"], "Deployment")["dsaforge-mlflow"]))
    doc["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFS"] = True
    with pytest.raises(chart.ChartError, match="readOnlyRootFS"):
        chart.validate([doc])


def test_presets_are_current():
    assert chart.write_presets(check=True) == []
    files = sorted(p.stem for p in (CHART / "files" / "presets").glob("*.json"))
    assert files == chart.preset_names()


def test_presets_configmap_holds_every_resolved_preset(rendered):
    cm = by_kind(rendered["default"], "ConfigMap")["dsaforge-presets"]
    assert sorted(cm["data"]) == [f"{n}.json" for n in chart.preset_names()]
    assert json.loads(cm["data"]["small.json"])["pipeline"]["gpus_per_stage"] == 1


def test_chart_version_recorded():
    chart.check_version()


def test_security_contexts_everywhere(rendered):
    for variant, docs in rendered.items():
        for name, kind, spec in pod_specs(docs):
            where = f"{variant}: {kind}/{name}"
            assert spec["automountServiceAccountToken"] is False, where
            # Pod Security "restricted": no host namespaces, ports or paths; only these volume types.
            assert not {"hostNetwork", "hostPID", "hostIPC"} & set(spec), where
            assert {next(k for k in v if k != "name") for v in spec.get("volumes", [])} <= {
                "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected",
                "secret"}, where
            assert not [p for c in containers(spec) for p in c.get("ports", []) if "hostPort" in p], where
            psc = spec["securityContext"]
            assert psc["runAsNonRoot"] is True and psc["runAsUser"] > 0, where
            sandbox = kind == "PodTemplate" and name.rsplit("-stage-", 1)[1] in SANDBOX
            assert psc["seccompProfile"]["type"] == ("Localhost" if sandbox else "RuntimeDefault"), where
            for c in containers(spec):
                sc = c["securityContext"]
                assert sc["readOnlyRootFilesystem"] is True, (where, c["name"])
                assert sc["allowPrivilegeEscalation"] is False, (where, c["name"])
                assert sc["capabilities"] == {"drop": ["ALL"]}, (where, c["name"])
                assert "add" not in sc["capabilities"] and not sc.get("privileged"), (where, c["name"])
                res = c["resources"]
                assert res["requests"]["cpu"] and res["requests"]["memory"] and res["limits"]["memory"], where


def test_probes_on_every_server(rendered):
    for name, kind, spec in pod_specs(rendered["gpu-pool"]):
        if kind in ("Deployment", "StatefulSet"):
            for c in spec["containers"]:
                assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(c), name
    mlflow = by_kind(rendered["default"], "Deployment")["dsaforge-mlflow"]["spec"]["template"]["spec"]
    probe = mlflow["containers"][0]["readinessProbe"]["httpGet"]
    # MLflow refuses unknown Host headers; the kubelet would send the pod IP.
    assert probe["path"] == "/health" and probe["httpHeaders"] == [{"name": "Host", "value": "localhost"}]
    console = by_kind(rendered["gpu-pool"], "Deployment")["dsaforge-console"]["spec"]["template"]["spec"]
    assert console["containers"][0]["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_only_the_launcher_gets_an_api_token(rendered):
    accounts = by_kind(rendered["gpu-pool"], "ServiceAccount")
    tokens = {name for name, sa in accounts.items() if sa.get("automountServiceAccountToken", True)}
    assert tokens == {"dsaforge-launcher"}
    console = by_kind(rendered["gpu-pool"], "Deployment")["dsaforge-console"]["spec"]["template"]["spec"]
    (projected,) = [v for v in console["volumes"] if v["name"] == "kfp-token"]
    assert projected["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "pipelines.kubeflow.org"


def test_rbac_is_least_privilege(rendered):
    docs = rendered["default"]
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    (role,) = by_kind(docs, "Role").values()
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): r for r in role["rules"]}
    assert rules[("trainer.kubeflow.org",), ("trainjobs",)]["verbs"] == ["create", "get", "list", "watch"]
    assert rules[("",), ("pods",)]["verbs"] == ["get", "list", "watch"]
    assert rules[("",), ("pods/log",)]["verbs"] == ["get"]
    templates = rules[("",), ("podtemplates",)]
    assert templates["verbs"] == ["get"]
    assert set(templates["resourceNames"]) == set(by_kind(docs, "PodTemplate"))
    assert len(rules) == 4 and not any("*" in v for r in role["rules"] for v in r["verbs"] + r["resources"])
    (binding,) = by_kind(docs, "RoleBinding").values()
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "dsaforge-launcher", "namespace": "ml"}]
    (gpu_binding,) = by_kind(rendered["gpu-pool"], "RoleBinding").values()
    assert [s["name"] for s in gpu_binding["subjects"]] == ["dsaforge-launcher", "default-editor"]
    minimal = by_kind(rendered["minimal"], "Role")["dsaforge-launcher"]
    assert not any("trainer.kubeflow.org" in r["apiGroups"] for r in minimal["rules"])


def test_gpu_pool_placement(rendered):
    templates = by_kind(rendered["gpu-pool"], "PodTemplate")
    values = yaml.safe_load((CHART / "ci" / "gpu-pool-values.yaml").read_text())["gpu"]
    for name, t in templates.items():
        spec = t["template"]["spec"]
        limits = spec["containers"][0]["resources"]["limits"]
        if t["metadata"]["labels"]["dsaforge.io/stage"] in ("pretrain", "warmup", "sparse", "sft", "grpo", "evaluate"):
            assert limits["nvidia.com/gpu"] == 8, name
            assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}, name
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
            assert spec["tolerations"] == values["tolerations"], name
            (shm,) = [v for v in spec["volumes"] if v["name"] == "dshm"]
            assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "256Gi"}, name
            assert {"name": "dshm", "mountPath": "/dev/shm"} in spec["containers"][0]["volumeMounts"]
            assert spec["containers"][0]["resources"]["requests"] == {"cpu": "96", "memory": "1536Gi"}
            assert spec["containers"][0]["image"] == "dsaforge:0.1.0"
        else:
            assert spec["containers"][0]["image"] == "dsaforge-cpu:0.1.0"
            assert "nvidia.com/gpu" not in limits and "tolerations" not in spec, name
            assert spec["nodeSelector"] == {"node-pool": "cpu"}, name
    cluster = yaml.safe_load(by_kind(rendered["gpu-pool"], "ConfigMap")["dsaforge-pipelines"]["data"]["cluster.yaml"])
    assert cluster["pipeline"]["node_selector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}


def test_cluster_config_layer_is_a_valid_dsaforge_config(rendered, tmp_path):
    for variant, docs in rendered.items():
        path = tmp_path / f"{variant}.yaml"
        path.write_text(by_kind(docs, "ConfigMap")["dsaforge-pipelines"]["data"]["cluster.yaml"])
        p = load_config("small", [str(path)]).pipeline
        assert (p.image, p.cpu_image, p.namespace) == ("dsaforge:0.1.0", "dsaforge-cpu:0.1.0", "ml")
        assert p.env["MLFLOW_TRACKING_URI"] == "http://dsaforge-mlflow.ml.svc.cluster.local:5000"
        password = {"MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD"}
        assert [(s.name, s.keys) for s in p.secrets][0] == (
            "mlflow-admin" if variant == "external-services" else "dsaforge-mlflow", password)
        assert p.host == "http://ml-pipeline.kubeflow.svc.cluster.local:8888" and p.gpu_toleration
    gpu = load_config("small", [str(tmp_path / "gpu-pool.yaml")]).pipeline
    assert gpu.shm_size == "256Gi" and gpu.cpu_node_selector == {"node-pool": "cpu"}
    assert [t.key for t in gpu.tolerations] == ["dedicated"]          # nvidia.com/gpu is gpu_toleration
    direct = chart.render(chart.install_helm(), sets=["mlflow.artifacts.proxied=false"])
    path.write_text(by_kind(direct, "ConfigMap")["dsaforge-pipelines"]["data"]["cluster.yaml"])
    p = load_config("small", [str(path)]).pipeline
    assert p.secrets[1].name == "dsaforge-minio" and p.secrets[1].keys == {
        "root-user": "AWS_ACCESS_KEY_ID", "root-password": "AWS_SECRET_ACCESS_KEY"}
    assert p.env["MLFLOW_S3_ENDPOINT_URL"] == "http://dsaforge-minio.ml.svc.cluster.local:9000"


def test_sandbox_profile_only_where_needed(helm, rendered):
    def profiles(docs):
        out = {}
        for t in by_kind(docs, "PodTemplate").values():
            spec, c = t["template"]["spec"], t["template"]["spec"]["containers"][0]
            sandbox = (spec.get("hostUsers") is False, c["securityContext"].get("procMount") == "Unmasked",
                       spec["securityContext"]["seccompProfile"]["type"] == "Localhost",
                       spec["serviceAccountName"] == "dsaforge-sandbox")
            assert len(set(sandbox)) == 1, (t["metadata"]["name"], sandbox)   # all or nothing
            out[t["metadata"]["labels"]["dsaforge.io/stage"]] = sandbox[0]
        return out

    got = profiles(rendered["default"])
    assert {s for s, sandboxed in got.items() if sandboxed} == SANDBOX and len(got) == 8
    # Nothing but sandbox stage templates ever leaves the host user namespace or the default seccomp profile.
    for variant, docs in rendered.items():
        for name, kind, spec in pod_specs(docs):
            if kind != "PodTemplate":
                assert "hostUsers" not in spec and spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
                assert all("procMount" not in c["securityContext"] for c in containers(spec)), name
    moved = profiles(chart.render(helm, sets=["sandbox.stages={synthesize}"]))
    assert {s for s, sandboxed in moved.items() if sandboxed} == {"synthesize"}
    gpu = by_kind(rendered["gpu-pool"], "PodTemplate")["dsaforge-stage-grpo"]["template"]["spec"]
    assert gpu["containers"][0]["securityContext"]["appArmorProfile"] == {
        "type": "Localhost", "localhostProfile": "dsaforge-sandbox"}
    seccomp = json.loads(by_kind(rendered["default"], "ConfigMap")["dsaforge-sandbox-seccomp"]["data"]["sandbox.json"])
    denied = set(seccomp["syscalls"][0]["names"])
    assert {"bpf", "keyctl", "ptrace", "init_module"} <= denied and not {"unshare", "clone", "mount"} & denied


def test_network_policies(rendered):
    docs = rendered["gpu-pool"]
    pols = by_kind(docs, "NetworkPolicy")
    assert set(pols) == {"dsaforge-mlflow", "dsaforge-postgresql", "dsaforge-minio", "dsaforge-console"}
    (rule,) = pols["dsaforge-mlflow"]["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"dsaforge.io/mlflow-client": "true"}}}]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    # Who carries the client label: the console and the stage pods, nothing else.
    clients = set()
    for d in docs:
        template = d["template"] if d["kind"] == "PodTemplate" else d["spec"].get("template") if d["kind"] in WORKLOADS else None
        if template and template["metadata"]["labels"].get("dsaforge.io/mlflow-client") == "true":
            clients.add(d["metadata"]["name"])
    assert clients == {"dsaforge-console"} | set(by_kind(docs, "PodTemplate"))
    (db_rule,) = pols["dsaforge-postgresql"]["spec"]["ingress"]
    assert [p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for p in db_rule["from"]] == [
        "mlflow", "mlflow-migration"]
    (s3_rule,) = pols["dsaforge-minio"]["spec"]["ingress"]
    assert len(s3_rule["from"]) == 2
    ext = by_kind(rendered["external-services"], "NetworkPolicy")["dsaforge-mlflow"]["spec"]["ingress"][0]["from"]
    assert ext[1] == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}
    assert not by_kind(rendered["minimal"], "NetworkPolicy")


def test_no_default_passwords(helm, rendered):
    def secrets(docs):
        return {(n, k): base64.b64decode(v).decode() for n, s in by_kind(docs, "Secret").items()
                for k, v in s["data"].items()}

    first, second = secrets(rendered["default"]), secrets(chart.render(helm))
    generated = {("dsaforge-mlflow", "MLFLOW_TRACKING_PASSWORD"), ("dsaforge-mlflow-flask", "flask-secret-key"),
                 ("dsaforge-postgresql", "password"), ("dsaforge-minio", "root-user"),
                 ("dsaforge-minio", "root-password")}
    assert set(first) == generated | {("dsaforge-mlflow", "MLFLOW_TRACKING_URI"),
                                      ("dsaforge-mlflow", "MLFLOW_TRACKING_USERNAME")}
    for key in generated:
        assert len(first[key]) >= 20 and first[key].isalnum() and first[key] != second[key], key
    assert first[("dsaforge-mlflow", "MLFLOW_TRACKING_URI")] == "http://dsaforge-mlflow.ml.svc.cluster.local:5000"
    # Nothing in values or the rendered chart carries a password; external services come only from existing Secrets.
    assert not re.search(r"(?im)^\s*\w*password(?!key)\w*\s*:", (CHART / "values.yaml").read_text())
    text = chart.template(helm).stdout.lower()
    for known in ("password1234", "minioadmin", "changeme"):
        assert known not in text
    assert set(by_kind(rendered["external-services"], "Secret")) == {"dsaforge-mlflow-flask"}
    proc = chart.template(helm, sets=["mlflow.auth.adminPassword=hunter2"])
    assert proc.returncode != 0 and "adminPassword" in proc.stderr


def test_mlflow_server_wiring(rendered):
    spec = by_kind(rendered["external-services"], "Deployment")["dsaforge-mlflow"]["spec"]["template"]["spec"]
    env = {e["name"]: e for e in spec["containers"][0]["env"]}
    assert env["DSAFORGE_DB_HOST"]["value"] == "mlflow-db.example.internal"
    assert env["DSAFORGE_DB_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-db", "key": "password"}
    assert env["DSAFORGE_DB_SSLMODE"]["value"] == "verify-full"
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-s3", "key": "AWS_ACCESS_KEY_ID"}
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"] == "https://s3.eu-central-1.amazonaws.com"
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-admin",
                                                                              "key": "MLFLOW_TRACKING_PASSWORD"}
    assert "mlflow.example.com" in env["DSAFORGE_MLFLOW_ALLOWED_HOSTS"]["value"].split(",")
    assert spec["initContainers"][0]["command"][-1] == "wait"
    jobs = by_kind(rendered["external-services"], "Job")
    assert list(jobs) == ["dsaforge-mlflow-migrate-1"]
    job_env = {e["name"]: e.get("value") for e in jobs["dsaforge-mlflow-migrate-1"]["spec"]["template"]["spec"]
               ["containers"][0]["env"]}
    assert job_env["DSAFORGE_CREATE_BUCKET"] == "false"
    # Stage pods get the tracking URI and credentials, and no S3 keys while MLflow proxies artifacts.
    stage = by_kind(rendered["default"], "PodTemplate")["dsaforge-stage-pretrain"]["template"]["spec"]
    names = {e["name"] for e in stage["containers"][0]["env"]}
    assert {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= names
    assert not {n for n in names if n.startswith("AWS_")}


def test_pdb_only_with_two_replicas(rendered):
    assert not by_kind(rendered["default"], "PodDisruptionBudget")
    assert set(by_kind(rendered["gpu-pool"], "PodDisruptionBudget")) == {"dsaforge-mlflow", "dsaforge-console"}


def test_console(rendered):
    assert not [d for d in rendered["default"] if d["metadata"]["name"].startswith("dsaforge-console")]
    ingress = by_kind(rendered["gpu-pool"], "Ingress")["dsaforge-console"]
    assert ingress["spec"]["rules"][0]["host"] == "dsaforge.example.com"
    (c,) = by_kind(rendered["gpu-pool"], "Deployment")["dsaforge-console"]["spec"]["template"]["spec"]["containers"]
    assert c["command"][:6] == ["dsaforge", "ui", "--host", "0.0.0.0", "--port", "8765"]
    assert c["command"][c["command"].index("--kfp-host") + 1] == "http://ml-pipeline.kubeflow.svc.cluster.local:8888"
    env = {e["name"]: e for e in c["env"]}
    assert env["DSAFORGE_CONSOLE_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "dsaforge-console", "key": "token"}
    assert env["KFP_TOKEN_FILE"]["value"] == "/var/run/secrets/kubeflow/pipelines/token"
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "dsaforge-mlflow"


@pytest.mark.parametrize("sets, message", [
    (["mlflow.replicas=-1"], "at '/mlflow/replicas': minimum: got -1, want 1"),
    (["mlflow.bogus=1"], "additional properties 'bogus' not allowed"),
    (["gpu.count=0"], "at '/gpu/count': minimum: got 0, want 1"),
    (["securityContext.runAsUser=0"], "at '/securityContext/runAsUser'"),
    (["sandbox.seccompProfile.type=RuntimeDefault"], "at '/sandbox/seccompProfile/type'"),
    (["sandbox.stages={synthesise}"], "at '/sandbox/stages/0'"),
    (["pipelines.stages.pretrian.pool=gpu"], "pretrian"),
    (["gpu.tolerations[0].operator=Maybe"], "at '/gpu/tolerations/0/operator'"),
    (["mlflow.auth.defaultPermission=ALL"], "at '/mlflow/auth/defaultPermission'"),
    (["postgresql.enabled=false"], "postgresql.enabled=false needs mlflow.database.host"),
    (["minio.enabled=false"], "minio.enabled=false needs mlflow.artifacts.existingSecret"),
    (["mlflow.ingress.enabled=true"], "mlflow.ingress.enabled=true needs mlflow.ingress.host"),
    (["mlflow.ingress.enabled=true", "mlflow.ingress.host=m.example.com"], "needs networkPolicy.mlflowFrom"),
    (["pipelines.stages.sft.pool=cpu"], "pipelines.stages.sft.resources is required for a CPU stage"),
    (["gpu.shmSize=lots"], "at '/gpu/shmSize'"),
    (["images.gpu.digest=sha256:abc"], "at '/images/gpu/digest'"),
])
def test_bad_values_rejected_with_a_clear_error(helm, sets, message):
    proc = chart.template(helm, sets=sets)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


def test_every_value_documented():
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        if not re.match(r"^\s*[\w.-]+:", line) or _in_list_item(lines, i):
            continue
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("#") and not lines[j].strip().startswith("# --"):
            j -= 1
        if j < 0 or not lines[j].strip().startswith("# --"):
            undocumented.append(line.strip())
    assert undocumented == []


def _in_list_item(lines, i):
    """A key inside a list item (e.g. a default toleration's `operator:`) is part of the documented value."""
    indent = len(lines[i]) - len(lines[i].lstrip())
    for line in reversed(lines[:i]):
        stripped = line.lstrip()
        if not stripped or stripped.startswith("#"):
            continue
        own = len(line) - len(stripped)
        if stripped.startswith("- ") and own + 2 == indent:
            return True
        if own < indent:
            return False
    return False


def test_schema_objects_are_closed():
    schema = json.loads((CHART / "values.schema.json").read_text())
    open_objects = []

    def walk(node, path):
        if isinstance(node, dict):
            if "properties" in node and node.get("additionalProperties") is not False:
                open_objects.append(path)
            for k, v in node.items():
                walk(v, f"{path}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}/{i}")

    walk(schema, "")
    assert open_objects == []
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values) == set(schema["properties"])


def test_notes_say_how_to_reach_everything(helm):
    proc = chart.subprocess.run([str(helm), "install", "t", str(CHART), "-n", "ml", "--dry-run=client",
                                 "-f", str(CHART / "ci" / "gpu-pool-values.yaml")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert "port-forward svc/t-dsaforge-mlflow 5000:5000" in notes
    assert "https://dsaforge.example.com" in notes and "dsaforge submit end-to-end" in notes
    assert "get secret dsaforge-mlflow -o jsonpath='{.data.MLFLOW_TRACKING_PASSWORD}'" in notes
