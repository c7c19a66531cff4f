"""Deployment files, statically verified: docker-compose.yml against the Compose spec's JSON
schema, the Kubernetes overlays rendered by `kubectl kustomize` and accepted by
`kubernetes-validate --strict`, every job's arguments a real `airatings` subcommand with real
options, every environment variable one the jobs read, the CronJob/Job/Pod settings issue
[10/11] asks for, the Dockerfile's runtime lock subset complete. Building the images and
running compose on a real engine is not done here (docs/deploying in the README says so)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from jobs.release import STEPS

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
OVERLAYS = ("cpu", "gpu")
# Read by the jobs (jobs/config.py, jobs/db.py, jobs/dbt_runner.py, jobs/score.py, cache shards)
ENV_READ = {
    "AIR_CONFIG", "AIR_DATA_DIR", "AIR_ARTIFACTS_DIR", "AIR_DBT_PROJECT_DIR", "DATABASE_URL",
    "AI_MODEL_VERSION", "AI_CAPTURE_THRESHOLD", "JOB_COMPLETION_INDEX", "JOB_COMPLETIONS",
}  # fmt: skip


def rendered(overlay: str) -> list[dict]:
    out = subprocess.run(
        [str(BIN / "kubectl"), "kustomize", str(REPO / "k8s" / "overlays" / overlay)],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def pod_specs(objs: list[dict]) -> list[tuple[str, dict, dict]]:
    """(name, job spec, pod spec) of every Job and CronJob."""
    out = []
    for o in objs:
        if o["kind"] == "Job":
            out.append((o["metadata"]["name"], o["spec"], o["spec"]["template"]["spec"]))
        elif o["kind"] == "CronJob":
            spec = o["spec"]["jobTemplate"]["spec"]
            out.append((o["metadata"]["name"], spec, spec["template"]["spec"]))
    return out


def check_args(args: list[str]) -> None:
    """``args`` (after the ``airatings`` entrypoint) is a real command with real options."""
    import typer.main

    from jobs import cli

    cmd = typer.main.get_command(cli.app)
    words = list(args)
    while words and hasattr(cmd, "commands") and words[0] in cmd.commands:
        cmd = cmd.commands[words.pop(0)]
    assert not hasattr(cmd, "commands"), f"{args}: no such airatings command"
    opts = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
    for w in words:
        if w.startswith("-"):
            assert w.split("=")[0] in opts, f"{args}: {w} is not an option of this command"


def check_env(name: str, value: str | None = None) -> None:
    from jobs.config import load_config

    if name.startswith("AIR__"):
        load_config(REPO / "configs" / "v2_baseline.yaml", env={name: value or "x"})  # raises
        return
    assert name in ENV_READ, f"{name} is read by no job"


def test_compose_file_matches_the_compose_spec():
    schema = json.loads((REPO / "docker" / "compose-spec.json").read_text())
    jsonschema.validate(compose(), schema)


def test_compose_jobs_are_real_commands_hardened_and_chained():
    doc = compose()
    services = doc["services"]
    # the release's steps in their order (jobs/release.py), then score and review
    chain = [*(step.name for step in STEPS), "score", "review"]
    for prev, name in zip(chain, chain[1:], strict=False):
        assert services[name]["depends_on"][prev]["condition"] == "service_completed_successfully"
    for name, svc in services.items():
        if name == "postgres":
            continue
        check_args(svc["command"])
        for key, value in svc.get("environment", {}).items():
            check_env(key, str(value))
        files = [f["path"] for f in svc["env_file"]]
        assert files[0] == "docker/defaults.env" and files[-1] == "${AIR_ENV_FILE:-.env.compose}"
        assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"]
        assert "no-new-privileges:true" in svc["security_opt"]
        assert svc["user"] == "10001:10001" and "/tmp" in svc["tmpfs"]
        assert all(v["type"] == "volume" for v in svc["volumes"])  # the long syntax
    gpu = services["train-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert ".env.compose" in (REPO / ".gitignore").read_text()
    # the env files compose reads (and the example users copy) set only what the jobs read
    for env_file in ("docker/defaults.env", "docker/demo.env", ".env.compose.example"):
        for line in (REPO / env_file).read_text().splitlines():
            # settings, and commented-out example settings ("# AIR__X__Y=1"), not prose
            name, sep, value = line.strip().lstrip("# ").partition("=")
            if sep and re.fullmatch(r"[A-Z][A-Z0-9_]*", name):
                check_env(name, value)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kustomize_renders_objects_kubernetes_validate_accepts(overlay, tmp_path):
    objs = rendered(overlay)
    kinds = sorted(o["kind"] for o in objs)
    assert kinds.count("Job") == 8 and kinds.count("CronJob") == 2
    assert {"ConfigMap", "PersistentVolumeClaim"} <= set(kinds)
    f = tmp_path / "all.yaml"
    f.write_text(yaml.safe_dump_all(objs))
    r = subprocess.run(
        [str(BIN / "kubernetes-validate"), "--strict", str(f)], capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_jobs_and_cronjobs_have_the_settings_and_restricted_pods(overlay):
    objs = rendered(overlay)
    for o in objs:
        labels = o["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/name") == "airatings", o["metadata"]["name"]
        if o["kind"] == "CronJob":
            s = o["spec"]
            assert s["concurrencyPolicy"] == "Forbid" and s["timeZone"]
            assert s["startingDeadlineSeconds"] > 0
            assert s["successfulJobsHistoryLimit"] >= 1 and s["failedJobsHistoryLimit"] >= 1
    for name, job, pod in pod_specs(objs):
        assert job["activeDeadlineSeconds"] > 0 and job["ttlSecondsAfterFinished"] > 0, name
        assert "backoffLimit" in job or "backoffLimitPerIndex" in job, name
        rules = job["podFailurePolicy"]["rules"]
        assert {
            "action": "FailJob",
            "onExitCodes": {"containerName": "airatings", "operator": "In", "values": [2]},
        } in rules
        assert any(r["action"] == "Ignore" for r in rules), name
        assert pod["restartPolicy"] == "Never"
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["seccompProfile"]["type"] == "RuntimeDefault"
        (c,) = pod["containers"]
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
        assert sc["readOnlyRootFilesystem"] is True
        check_args(c["args"])
        for e in c["env"]:
            check_env(e["name"], e.get("value"))
        if job.get("completionMode") == "Indexed":
            env = {e["name"]: e.get("value") for e in c["env"]}
            assert env["JOB_COMPLETIONS"] == str(job["completions"]), name
    env = {e["name"]: e for e in pod_specs(objs)[0][2]["containers"][0]["env"]}
    assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == "airatings-database"
    train = next(p for n, _, p in pod_specs(objs) if n == "airatings-train")
    if overlay == "gpu":
        assert train["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert train["tolerations"][0]["key"] == "nvidia.com/gpu"
    else:
        assert "nvidia.com/gpu" not in train["containers"][0]["resources"]["limits"]


def test_the_configmap_config_loads_in_the_image_layout(tmp_path):
    """k8s/base/config.yaml extends the image's baseline (/app/configs/...): with that file
    where the image puts it, it loads and validates."""
    from jobs.config import load_config

    app = tmp_path / "app" / "configs"
    app.mkdir(parents=True)
    shutil.copy(REPO / "configs" / "v2_baseline.yaml", app / "v2_baseline.yaml")
    text = (REPO / "k8s" / "base" / "config.yaml").read_text()
    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(text.replace("/app/configs/", f"{app}/"))
    cfg = load_config(cfg_file, env={})
    assert cfg.train.backbone


def test_the_runtime_lock_subset_is_complete_and_has_no_torch(tmp_path):
    """docker/Dockerfile's runtime stage installs scripts/lock_subset.py's part of the lock
    with --no-deps: pip, resolving it with dependencies, must find nothing missing."""
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "lock_subset.py"), str(REPO / "requirements.lock"),
         str(REPO / "pyproject.toml")], capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    names = {
        line.split("==")[0]
        for line in out.splitlines()
        if "==" in line and not line.startswith(" ")
    }
    # onnx: the scorer's registry check parses model.onnx (found by running score in the
    # runtime image, which lacked it)
    assert {
        "onnxruntime",
        "onnx",
        "psycopg",
        "dbt-core",
        "duckdb",
        "aiohttp",
        "setuptools",
    } <= names
    assert not names & {"torch", "torchvision", "onnxsim", "ruff", "pytest"}
    lock = tmp_path / "runtime.lock"
    lock.write_text(out)
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
         "--require-hashes", "-q", "-r", str(lock)], capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]


def test_just_release_says_when_no_engine_answers_and_runs_nothing(tmp_path):
    """`just release` checks the engine before anything else: exit 2, naming the socket and
    the way to get an engine; no image is built, no compose project created."""
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-such.sock"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "compose_release.py"), "--demo"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert f"unix://{tmp_path}/no-such.sock" in proc.stderr
    assert "scripts/docker-engine.sh start" in proc.stderr and "nothing was run" in proc.stderr
    assert "building" not in proc.stderr and proc.stdout == ""


def test_gpu_training_is_an_indexed_job_whose_torchrun_matches_its_shape():
    """The GPU overlay's training: N pods of an Indexed Job, torchrun (through jobs.distributed,
    which keeps the jobs' exit codes) with --nnodes = completions = JOB_COMPLETIONS, node rank
    from the completion index, rendezvous on pod 0 through the headless Service the pods'
    subdomain names, and then a real airatings command."""
    objs = rendered("gpu")
    (job,) = [o for o in objs if o["kind"] == "Job" and o["metadata"]["name"] == "airatings-train"]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    (svc,) = [
        o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == pod["subdomain"]
    ]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {"batch.kubernetes.io/job-name": "airatings-train"}
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] >= 2
    (c,) = pod["containers"]
    cmd, env = c["command"], {e["name"]: e.get("value") for e in c["env"]}
    assert cmd[:3] == ["python", "-m", "jobs.distributed"] and cmd[-2:] == [
        "--no-python",
        "airatings",
    ]
    flags = dict(a.split("=", 1) for a in cmd[3:-2])
    assert flags["--nnodes"] == "$(JOB_COMPLETIONS)" and env["JOB_COMPLETIONS"] == str(
        spec["completions"]
    )
    assert flags["--node-rank"] == "$(JOB_COMPLETION_INDEX)" and flags["--rdzv-backend"] == "c10d"
    host, port = flags["--rdzv-endpoint"].split(":")
    assert host == f"{job['metadata']['name']}-0.{svc['metadata']['name']}"
    assert int(port) in {p["containerPort"] for p in c["ports"]}
    check_args(c["args"])
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    # the launcher's options are torchrun's own
    from torch.distributed.run import get_args_parser

    pod_env = {"JOB_COMPLETIONS": env["JOB_COMPLETIONS"], "JOB_COMPLETION_INDEX": "1"}
    expanded = [re.sub(r"\$\((\w+)\)", lambda m: pod_env[m.group(1)], a) for a in cmd[3:]]
    parsed = get_args_parser().parse_args([*expanded, *c["args"]])
    assert parsed.no_python and parsed.training_script == "airatings" and parsed.node_rank == 1
