"""deploy/kubernetes checked offline: every manifest against the Kubernetes API schemas
(kubernetes-validate, strict), and the manifests agreeing with the code: settings that exist,
probe paths the app serves, commands the CLI has, the port, the user, and a grace period that
covers the preStop sleep and the in-flight grace. The index Job's script runs for real."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from service.api.main import create_app
from service.cli.main import app as cli
from service.config import Settings
from service.db import active_index_version, make_engine, make_sessionmaker

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
#: The oldest Kubernetes these manifests are for (the preStop `sleep` action is on by default
#: from 1.30); validated against its schemas.
KUBERNETES_VERSION = "1.31.0"


def manifests() -> dict[str, dict[str, Any]]:
    """Every resource the kustomization applies, by kind/name."""
    kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    out = {}
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((KUBE / name).read_text()):
            out[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return out


M = manifests()
SETTINGS = M["ConfigMap/geoloc-settings"]["data"]
SECRETS = M["Secret/geoloc-secrets"]["stringData"]
DEPLOYMENT = M["Deployment/geoloc"]
POD = DEPLOYMENT["spec"]["template"]["spec"]
API = POD["containers"][0]


def test_every_manifest_matches_the_kubernetes_schemas() -> None:
    assert set(M) >= {
        "Deployment/geoloc", "Service/geoloc", "HorizontalPodAutoscaler/geoloc",
        "PodDisruptionBudget/geoloc", "Job/geoloc-migrate", "Job/geoloc-index",
        "ConfigMap/geoloc-settings", "Secret/geoloc-secrets",
        "PersistentVolumeClaim/geoloc-data", "Namespace/geoloc",
        "NetworkPolicy/geoloc-api", "NetworkPolicy/geoloc-jobs",
    }  # fmt: skip
    for doc in M.values():
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_validator_refuses_a_misspelt_field() -> None:
    bad = copy.deepcopy(DEPLOYMENT)
    probe = bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]
    probe["pat"] = probe.pop("path")
    with pytest.raises(kubernetes_validate.ValidationError, match="'pat' was unexpected"):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


def probe_problems(container: dict[str, Any]) -> list[str]:
    """Probes whose path the app does not serve (404 before it has even started) or whose port
    the container does not name."""
    client = TestClient(create_app(Settings()))  # no lifespan: nothing loads
    ports = {p["name"] for p in container.get("ports", [])}
    problems = []
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[kind]["httpGet"]
        if client.get(get["path"]).status_code == 404:
            problems.append(f"{kind}: the app serves no {get['path']}")
        if get["port"] not in ports:
            problems.append(f"{kind}: no container port named {get['port']}")
    return problems


def test_probes_use_paths_the_app_serves() -> None:
    assert probe_problems(API) == []
    assert API["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert API["livenessProbe"]["httpGet"]["path"] == "/healthz"
    wrong = copy.deepcopy(API)
    wrong["readinessProbe"]["httpGet"]["path"] = "/ready"
    assert probe_problems(wrong) == ["readinessProbe: the app serves no /ready"]


def test_settings_ports_and_users_agree_with_the_code() -> None:
    fields = set(Settings.model_fields)
    for key in [*SETTINGS, *SECRETS]:
        assert key.startswith("GEOLOC_") and key.removeprefix("GEOLOC_").lower() in fields, key
    s = Settings(**{k.removeprefix("GEOLOC_").lower(): v for k, v in SETTINGS.items()})
    assert API["ports"][0]["containerPort"] == s.port
    assert s.workers == 1 and not s.migrate_on_start  # the Job migrates, once
    # the defaults the comments rely on
    assert s.shutdown_grace_s == Settings.model_fields["shutdown_grace_s"].default
    assert s.shutdown_drain_s == Settings.model_fields["shutdown_drain_s"].default == 0
    pre_stop = API["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert (
        POD["terminationGracePeriodSeconds"] >= pre_stop + s.shutdown_drain_s + s.shutdown_grace_s
    )
    dockerfile = (ROOT / "Dockerfile").read_text()
    user = re.search(r"^USER (\d+):(\d+)", dockerfile, re.MULTILINE)
    assert user is not None
    for pod in (POD, *(M[j]["spec"]["template"]["spec"] for j in M if j.startswith("Job/"))):
        ctx = pod["securityContext"]
        assert ctx["runAsNonRoot"] and str(ctx["runAsUser"]) == user.group(1), ctx
        for c in pod["containers"]:
            assert c["securityContext"]["readOnlyRootFilesystem"], c["name"]
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], c["name"]
            mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts, c["name"]  # the only writable place besides /data
    data = {m["mountPath"]: m for m in API["volumeMounts"]}[s.data_dir.as_posix()]
    assert data["readOnly"] is True  # replicas only read indexes; the index Job writes them
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in POD["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {"geoloc-data"} and "PersistentVolumeClaim/geoloc-data" in M
    selector = DEPLOYMENT["spec"]["selector"]["matchLabels"]
    assert M["Service/geoloc"]["spec"]["selector"] == selector
    assert M["PodDisruptionBudget/geoloc"]["spec"]["selector"]["matchLabels"] == selector
    assert M["HorizontalPodAutoscaler/geoloc"]["spec"]["scaleTargetRef"]["name"] == "geoloc"


def test_containers_run_commands_the_cli_has() -> None:
    runner = CliRunner()
    for name in ("Deployment/geoloc", "Job/geoloc-migrate"):
        args = M[name]["spec"]["template"]["spec"]["containers"][0]["args"]
        result = runner.invoke(cli, [*args, "--help"])
        assert result.exit_code == 0, (name, result.output)
    assert M["Job/geoloc-migrate"]["spec"]["template"]["spec"]["containers"][0]["args"] == [
        "db", "upgrade", "--wait",
    ]  # fmt: skip


@pytest.mark.timeout(300)
def test_the_index_job_script_builds_and_activates(tmp_path: Path) -> None:
    """The Job's own script, run as it is (setup made light: no reference tiles or
    calibration, a coarse default gallery): the gallery it builds becomes the active one."""
    container = M["Job/geoloc-index"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["/bin/sh", "-ec"]
    script = container["args"][0]
    venv_bin = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin"
    env = {
        "PATH": f"{venv_bin}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "GEOLOC_DATA_DIR": str(tmp_path / "data"),
        "GEOLOC_SETUP_REFERENCE_TILES": "0",
        "GEOLOC_SETUP_CALIBRATION_TILES": "0",
        "GEOLOC_DEFAULT_RES": "1",
    }
    done = subprocess.run(
        ["/bin/sh", "-ec", script.replace("--res 4", "--res 2")],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    published = re.findall(r"^published default-bluemarble/(\S+?):", done.stdout, re.MULTILINE)
    assert len(published) == 1, done.stdout[-2000:]
    s = Settings(data_dir=tmp_path / "data")
    engine = make_engine(s.db_url)
    try:
        with make_sessionmaker(engine)() as session:
            active = active_index_version(session, "default-bluemarble")
    finally:
        engine.dispose()
    assert active is not None and active.version == published[0]


def _checkov(directory: Path) -> dict[str, Any]:
    checkov = ROOT / ".venv-policy" / "bin" / "checkov"
    if not checkov.exists():
        pytest.skip("`make test` installs checkov into .venv-policy (a venv of its own)")
    done = subprocess.run(
        [str(checkov), "-d", str(directory), "--framework", "kubernetes", "-o", "json"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    report = json.loads(done.stdout)
    return report[0] if isinstance(report, list) else report


@pytest.mark.timeout(600)
def test_the_policy_checker_passes_and_catches_a_writable_root(tmp_path: Path) -> None:
    """checkov's Kubernetes policies: no failure; the only exceptions are the two annotated in
    the manifests with their reasons (image digest, secrets as environment)."""
    report = _checkov(KUBE)
    summary = report["summary"]
    assert summary["failed"] == 0, [
        (c["check_id"], c["resource"]) for c in report["results"]["failed_checks"]
    ]
    assert summary["passed"] > 200
    skipped = {c["check_id"] for c in report["results"]["skipped_checks"]}
    assert skipped == {"CKV_K8S_43", "CKV_K8S_35"}, skipped
    # The same manifests with a writable root file system fail it.
    bad = tmp_path / "kubernetes"
    shutil.copytree(KUBE, bad)
    deployment = bad / "deployment.yaml"
    deployment.write_text(
        deployment.read_text().replace(
            "readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false"
        )
    )
    failed = {c["check_id"] for c in _checkov(bad)["results"]["failed_checks"]}
    assert "CKV_K8S_22" in failed, failed  # "Use read-only filesystem for containers"


def test_the_image_is_the_release_it_belongs_to() -> None:
    version = re.search(
        r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE
    )
    assert version is not None
    for name in ("Deployment/geoloc", "Job/geoloc-migrate", "Job/geoloc-index"):
        container = M[name]["spec"]["template"]["spec"]["containers"][0]
        assert container["image"] == f"geoloc:{version.group(1)}", name
