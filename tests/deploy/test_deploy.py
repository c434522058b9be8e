"""Deployment files: compose and Dockerfiles parse and lint (scripts/check_deploy.sh), and keep their promises.

No Docker engine is needed: the script runs `docker compose config` and hadolint; the rest reads the files.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT

COMPOSE = ROOT / "docker-compose.yml"
GPUS = ROOT / "docker-compose.gpus.yml"
API_DOCKERFILE = ROOT / "docker" / "api.Dockerfile"
WORKER_DOCKERFILE = ROOT / "docker" / "worker.Dockerfile"
API_REQS = ROOT / "docker" / "requirements-api.txt"
WORKER_REQS = ROOT / "docker" / "requirements-worker.txt"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;#]+)$")
SECRETISH = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|ACCESS_KEY|CREDENTIAL|BASIC_AUTH", re.I)


# --- readers -------------------------------------------------------------------------------------------------

class _ComposeLoader(yaml.SafeLoader):
    """SafeLoader that reads Compose's merge tags (`!override`, `!reset`) as their plain value."""


_ComposeLoader.add_multi_constructor(
    "!", lambda loader, suffix, node: (
        loader.construct_sequence(node, deep=True) if isinstance(node, yaml.SequenceNode)
        else loader.construct_mapping(node, deep=True) if isinstance(node, yaml.MappingNode)
        else loader.construct_scalar(node)))


def _compose(path: Path = COMPOSE) -> dict[str, Any]:
    return yaml.load(path.read_text(), Loader=_ComposeLoader)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(lines: list[str]) -> dict[str, str]:
    """name (normalised, extras dropped) -> version, for `name[extras]==version` lines; others refused."""
    out: dict[str, str] = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = PIN.match(line)
        assert m, f"not an exact pin: {line!r}"
        out[_norm(m.group(1))] = m.group(3)
    return out


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per Dockerfile instruction, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        line = pending + stripped
        pending = ""
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def _final_stage(path: Path) -> list[tuple[str, str]]:
    ins = _instructions(path)
    last_from = max(i for i, (k, _) in enumerate(ins) if k == "FROM")
    return ins[last_from:]


def _command(service: dict[str, Any]) -> list[str]:
    cmd = service["command"]
    return cmd if isinstance(cmd, list) else cmd.split()


def _default(value: str) -> str:
    """The default of an overridable `${VAR:-default}` value (the value itself when it is not one)."""
    m = re.fullmatch(r"\$\{\w+:-(.*)\}", value)
    return m.group(1) if m else value


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or one of its parents decides."""
    ignored = False
    parts = path.split("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        rx = re.escape(body.strip("/")).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        rx = rx.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(rx, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            ignored = not negate
    return ignored


# --- the script: compose config (no engine) and hadolint ------------------------------------------------------

def test_check_deploy_script() -> None:
    out = subprocess.run(["bash", str(ROOT / "scripts" / "check_deploy.sh")], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    if out.returncode == 2:
        pytest.skip("DEPLOYMENT FILES NOT VALIDATED: scripts/check_deploy.sh cannot install its tools here: "
                    + out.stderr.strip().splitlines()[-1])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "all checks passed" in out.stdout


# --- compose ---------------------------------------------------------------------------------------------------

def test_compose_has_the_services_with_pinned_images() -> None:
    services = _compose()["services"]
    assert {"redis", "postgres", "minio", "minio-init", "api", "worker", "flower"} <= set(services)
    for name, svc in services.items():
        image = svc.get("image", "")
        if "build" in svc:
            assert (ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file(), name
            continue
        tag = image.rsplit(":", 1)[-1] if ":" in image else ""
        assert tag and tag != "latest" and re.search(r"\d", tag), f"{name}: image not pinned by tag: {image!r}"


def test_worker_reserves_exactly_one_gpu_with_concurrency_1() -> None:
    worker = _compose()["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    cmd = _command(worker)
    joined = " ".join(cmd)
    assert re.search(r"(--concurrency[ =]|-c )1\b", joined), joined
    assert "-Q gpu" in joined and "-n gpu@%h" in joined
    assert "--prefetch-multiplier=1" in cmd and "--max-tasks-per-child=1" in cmd
    statedb = next(a.split("=", 1)[1] for a in cmd if a.startswith("--statedb="))
    mounts = [v.split(":")[1] for v in worker["volumes"]]
    assert any(statedb.startswith(m + "/") for m in mounts), f"--statedb {statedb} is not on a volume {mounts}"
    assert any(m == "/var/cache/spinquant/huggingface" for m in mounts), "no model cache volume (HF_HOME)"


def test_worker_image_runs_the_same_command() -> None:
    cmd = next(json.loads(a) for k, a in _final_stage(WORKER_DOCKERFILE) if k == "CMD")
    assert cmd == _command(_compose()["services"]["worker"])


def test_gpus_override_gives_each_extra_worker_its_own_gpu() -> None:
    services = _compose(GPUS)["services"]
    assert services, "docker-compose.gpus.yml defines no worker"
    ids: list[str] = []
    for name, svc in services.items():
        assert svc["extends"] == {"file": "docker-compose.yml", "service": "worker"}, name
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert "count" not in device and device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert device["device_ids"] == [name.removeprefix("worker-gpu")], name
        ids += device["device_ids"]
    assert "0" not in ids and len(ids) == len(set(ids))
    # Without !override Compose appends to the inherited `count: 1` request: two GPUs per worker.
    assert GPUS.read_text().count("devices: !override") == len(services)


def test_redis_is_persistent_and_never_evicts() -> None:
    conf: dict[str, str] = {}
    for line in (ROOT / "docker" / "redis.conf").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            conf[key] = value
    assert conf["appendonly"] == "yes" and conf["maxmemory-policy"] == "noeviction"
    redis = _compose()["services"]["redis"]
    assert redis["command"] == ["redis-server", "/usr/local/etc/redis/redis.conf"]
    assert "./docker/redis.conf:/usr/local/etc/redis/redis.conf:ro" in redis["volumes"]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_api_waits_for_healthy_stores_then_migrates_and_serves() -> None:
    services = _compose()["services"]
    api = services["api"]
    assert api["depends_on"] == {"postgres": {"condition": "service_healthy"},
                                 "redis": {"condition": "service_healthy"},
                                 "minio-init": {"condition": "service_completed_successfully"}}
    script = " ".join(_command(api))
    assert script.index("python -m api db upgrade") < script.index("python -m api serve --host 0.0.0.0")
    assert _command(api) == next(json.loads(a) for k, a in _final_stage(API_DOCKERFILE) if k == "CMD")
    assert any(str(p).endswith(":8000") for p in api["ports"])
    env = api["environment"]
    assert _default(env["SPINQUANT_DATABASE_URL"]).startswith("postgresql+psycopg://spinquant:${POSTGRES_PASSWORD:?")
    assert _default(env["SPINQUANT_REDIS_URL"]) == "redis://redis:6379/0" and env["SPINQUANT_STORE"] == "s3"
    for key in ("BUCKET", "ENDPOINT_URL", "REGION", "ACCESS_KEY_ID", "SECRET_ACCESS_KEY", "PREFIX"):
        assert f"SPINQUANT_S3_{key}" in env
    assert "SPINQUANT_WORK_ROOT" in env
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"][1]
    assert services["minio"]["healthcheck"]["test"]


def test_secrets_come_from_the_environment() -> None:
    text = COMPOSE.read_text()
    for var in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "SPINQUANT_S3_SECRET_ACCESS_KEY"):
        assert f"${{{var}:?" in text, f"{var} is not required from the environment"
    services = _compose()["services"]
    for name, svc in services.items():
        env = svc.get("environment", {})
        for key, value in env.items():
            if SECRETISH.search(key):
                assert str(value).startswith("${"), f"{name}: {key} has a literal value"
        assert not any(SECRETISH.search(k) for k in svc.get("build", {}).get("args", {})), name
    flower = services["flower"]
    assert flower["profiles"] == ["monitoring"] and 'test -n "$$FLOWER_BASIC_AUTH"' in flower["command"][2]
    example = (ROOT / ".env.example").read_text()
    for var in set(re.findall(r"\$\{(\w+):\?", text)) | {"HF_TOKEN", "FLOWER_BASIC_AUTH"}:
        assert re.search(rf"^{var}=", example, re.M), f".env.example lacks {var}"
    assert "/.env" in (ROOT / ".gitignore").read_text().split()


# --- images ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dockerfile", [API_DOCKERFILE, WORKER_DOCKERFILE], ids=["api", "worker"])
def test_image_runs_unprivileged_with_nothing_secret_baked_in(dockerfile: Path) -> None:
    users = [a for k, a in _final_stage(dockerfile) if k == "USER"]
    assert users, "the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"runs as {users[-1]}"
    for keyword, args in _instructions(dockerfile):
        if keyword in ("ARG", "ENV"):
            names = re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)(?==|\s|$)", args)
            assert not any(SECRETISH.search(n) for n in names), f"{keyword} {args}"
        if keyword == "FROM":
            image = args.split()[0]
            assert ":" in image and not image.endswith(":latest"), f"base image not pinned: {image}"
    assert "HF_TOKEN" not in "".join(a for k, a in _instructions(dockerfile) if k in ("ARG", "ENV"))


def test_api_image_has_a_healthz_healthcheck_and_serves_on_8000() -> None:
    final = _final_stage(API_DOCKERFILE)
    (health,) = [a for k, a in final if k == "HEALTHCHECK"]
    assert "http://127.0.0.1:8000/healthz" in health and "urllib" in health
    assert "--host 0.0.0.0 --port 8000" in next(a for k, a in final if k == "CMD")


def test_api_requirements_are_pinned_torch_free_and_match_pyproject() -> None:
    api = _pins(API_REQS.read_text().splitlines())
    assert not {n for n in api if n in ("torch", "numpy", "triton", "fast-hadamard-transform")
                or n.startswith(("nvidia-", "cuda-"))}
    project = _pyproject()["project"]
    service = _pins(project["optional-dependencies"]["service"])
    base = _pins(project["dependencies"])
    for name, version in service.items():
        assert api.get(name) == version, f"{name}: requirements-api.txt {api.get(name)} != pyproject {version}"
    for name in ("pydantic", "huggingface-hub", "tqdm"):
        assert api[name] == base[name], name


def test_worker_requirements_match_pyproject_and_the_api_image() -> None:
    worker = _pins(WORKER_REQS.read_text().splitlines())
    api = _pins(API_REQS.read_text().splitlines())
    project = _pyproject()["project"]
    base = _pins(project["dependencies"])
    assert "torch" not in worker  # installed from the PyTorch CUDA index (docker/worker.Dockerfile)
    for name, version in (base | _pins(project["optional-dependencies"]["service"])).items():
        if name != "torch":
            assert worker.get(name) == version, f"{name}: requirements-worker.txt {worker.get(name)} != {version}"
    assert {n: v for n, v in api.items() if worker.get(n, v) != v} == {}
    torch_arg = re.search(r"^ARG TORCH_VERSION=(\S+)$", WORKER_DOCKERFILE.read_text(), re.M)
    assert torch_arg and torch_arg.group(1) == base["torch"]


def test_dockerignore_keeps_tests_runs_venv_caches_git_and_secrets_out() -> None:
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.lstrip().startswith("#")]
    for path in ("tests/conftest.py", "tests/fixtures/models/x/model.safetensors", "runs/demo/x", ".venv/bin/python",
                 ".git/HEAD", ".env", "api/__pycache__/main.cpython-311.pyc", ".pytest_cache/v/x",
                 "spinquant_service.egg-info/PKG-INFO", "bench/accuracy.py", "scripts/check_deploy.sh",
                 "client/spinquant_client/cli.py"):
        assert _ignored(path, patterns), f"{path} would be sent to the image build"
    for path in ("pyproject.toml", "README.md", "api/main.py", "service/migrations/versions/0001_initial.py",
                 "quant_core/config.py", "worker/tasks.py", "docker/requirements-api.txt",
                 "docker/requirements-worker.txt"):
        assert not _ignored(path, patterns), f"{path} is missing from the image build"
