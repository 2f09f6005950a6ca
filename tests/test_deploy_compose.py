"""What a careless edit of docker-compose.yml, the Dockerfile or .dockerignore would break.

No Docker engine runs here (nor in CI), so these read the files: the services and their order, the
one volume, the GPU reservations, the pinned GPU stack, and that every command they run names a
module, script or file this project really has.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("migrate", "api", "worker")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def _args(dockerfile: list[tuple[str, str]]) -> dict[str, str]:
    return dict(arg.split("=", 1) for kind, arg in dockerfile if kind == "ARG" and "=" in arg)


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else list(command)


# --- docker-compose.yml -------------------------------------------------------------------------------


@pytest.mark.skipif(
    not shutil.which("docker-compose"), reason="docker-compose not installed (scripts/install-system.sh)"
)
def test_compose_config_is_valid(tmp_path: Path) -> None:
    """`docker-compose config` (Debian's 1.29: it validates against the Compose specification's schema
    and resolves the file, no Docker daemon needed) accepts the file and lists every service, the
    second GPU's worker under its profile. 1.29 predates the top-level `name` key, which Compose v2
    reads, so the copy it checks goes without that one line."""
    text = (ROOT / "docker-compose.yml").read_text()
    assert re.search(r"^name: \S+$", text, re.M)
    copy = tmp_path / "docker-compose.yml"
    copy.write_text(re.sub(r"^name: \S+\n", "", text, flags=re.M))

    resolved = subprocess.run(
        ["docker-compose", "-f", str(copy), "--project-directory", str(ROOT), "config"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resolved.returncode == 0, resolved.stderr
    services = subprocess.run(
        ["docker-compose", "-f", str(copy), "--project-directory", str(ROOT), "--profile", "gpu1"]
        + ["config", "--services"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert services.returncode == 0, services.stderr
    assert set(services.stdout.split()) == {"postgres", "migrate", "vllm", "api", "worker", "worker-gpu1"}
    assert "ports:" in resolved.stdout  # the API's one published port survives the resolution


def test_services_and_start_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(SERVICES) <= set(services)
    assert services["migrate"].get("restart", "no") == "no"
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert services[name]["restart"] in ("always", "unless-stopped", "on-failure")


def test_all_services_share_one_data_volume(compose: dict[str, Any]) -> None:
    services = compose["services"]
    mounts = {name: [str(v).split(":") for v in services[name]["volumes"]] for name in SERVICES}
    volumes = {tuple(m) for ms in mounts.values() for m in ms}
    assert len(volumes) == 1, f"one volume for database, uploads, checkpoints, adapters, HF cache: {volumes}"
    volume, target = next(iter(volumes))
    assert volume in compose["volumes"]
    for name in SERVICES:
        env = services[name]["environment"]
        assert env["GPTOSS_DATA_DIR"] == target
        assert env["HF_HOME"].startswith(target + "/")
        assert re.fullmatch(r"\$\{HF_TOKEN(:?-[^}]*)?\}", env["HF_TOKEN"]), "HF token from the environment"


@pytest.mark.parametrize("name", ["vllm", "worker"])
def test_gpu_reserved(compose: dict[str, Any], name: str) -> None:
    devices = compose["services"][name]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)


def test_service_commands_exist_in_the_project(compose: dict[str, Any]) -> None:
    for name in SERVICES:
        _check_command(_command(compose["services"][name]))


def _check_command(argv: list[str]) -> None:
    """Each command the image runs must resolve to this project's code."""
    program = argv[0]
    if program == "python" and argv[1] == "-m":
        importlib.import_module(argv[2])
    elif program == "uvicorn":
        module, attr = argv[1].split(":")
        factory = getattr(importlib.import_module(module), attr)
        assert callable(factory) and "--factory" in argv
    elif program == "alembic":
        assert argv[1:] == ["upgrade", "head"]
        assert (ROOT / "alembic.ini").is_file() and (ROOT / "migrations/env.py").is_file()
        assert importlib.util.find_spec("alembic") is not None
    else:
        pytest.fail(f"unknown command in docker-compose.yml: {argv}")


def _defaults(value: str) -> str:
    """A compose value with every ${VAR:-default} replaced by its default, as with nothing set."""
    return re.sub(r"\$\{[A-Z_0-9]+:-([^}]*)\}", r"\1", value)


def _flags(service: dict[str, Any]) -> dict[str, str]:
    """--name=value (and bare --name: '') of a service's command."""
    return {
        arg.split("=", 1)[0]: (arg.split("=", 1) + [""])[1]
        for arg in _command(service)
        if arg.startswith("--")
    }


def test_vllm_service_serves_the_shared_base_with_lora(compose: dict[str, Any]) -> None:
    """The official vLLM OpenAI-server image at a pinned version, run-time LoRA loading on, its
    limits from the same variables the api reads, never published, healthy only once /health answers."""
    vllm = compose["services"]["vllm"]
    assert re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+", vllm["image"]), "pin a version, never latest"
    assert Version(vllm["image"].split(":v")[1]) >= Version("0.26.0")  # gpt-oss expert LoRA (fused MoE LoRA)
    assert vllm["entrypoint"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    flags = _flags(vllm)
    assert flags["--model"] == "${GPTOSS_VLLM_MODEL:-openai/gpt-oss-20b}"  # gpt-oss's own MXFP4 checkpoint
    assert "--enable-lora" in flags and "--enable-sleep-mode" in flags
    for flag, variable in [
        ("--max-lora-rank", "GPTOSS_VLLM_MAX_LORA_RANK"),
        ("--max-cpu-loras", "GPTOSS_VLLM_MAX_CPU_LORAS"),
        ("--max-loras", "GPTOSS_VLLM_MAX_LORAS"),
        ("--gpu-memory-utilization", "GPTOSS_VLLM_GPU_MEMORY_UTILIZATION"),
    ]:
        assert re.fullmatch(r"\$\{" + variable + r":-[\d.]+\}", flags[flag]), flag
    env = vllm["environment"]
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "1"  # /v1/load_lora_adapter and unload
    assert env["VLLM_SERVER_DEV_MODE"] == "1"  # /sleep and /wake_up
    assert "ports" not in vllm and "expose" not in vllm  # reachable from the compose network only
    check = " ".join(vllm["healthcheck"]["test"])
    assert f"127.0.0.1:{flags['--port']}/health" in check


def test_api_generates_through_vllm(compose: dict[str, Any]) -> None:
    """The api's settings (every variable at its default) pick the vLLM engine at the vllm service's
    address and agree with the server's limits; it waits for vLLM to be healthy; the folders it
    registers are where vLLM reads them, read-only."""
    from app.config import Settings

    services = compose["services"]
    api, vllm = services["api"], services["vllm"]
    env = {k: _defaults(str(v)) for k, v in api["environment"].items()}
    settings = Settings(
        **{k.removeprefix("GPTOSS_").lower(): v for k, v in env.items() if k.startswith("GPTOSS_")}
    )
    assert settings.uses_vllm and settings.engine == "vllm"
    flags = {k: _defaults(v) for k, v in _flags(vllm).items()}
    assert settings.vllm_url == f"http://vllm:{flags['--port']}"
    assert settings.vllm_max_lora_rank == int(flags["--max-lora-rank"])
    assert settings.vllm_max_cpu_loras == int(flags["--max-cpu-loras"])
    assert settings.resolved_base_model() == "unsloth/gpt-oss-20b"  # without a GPU in the api too
    assert api["depends_on"]["vllm"]["condition"] == "service_healthy"
    assert "deploy" not in api, "the api holds no model: the GPU is vllm's and the worker's"
    data_volume, data_dir = str(api["volumes"][0]).split(":")
    assert settings.data_dir == Path(data_dir)
    assert f"{data_volume}:{data_dir}:ro" in vllm["volumes"]  # adapters at the path the api registers


def test_postgres_service_backs_the_queue_by_default(compose: dict[str, Any]) -> None:
    """The official image, its own volume (not the data volume), a healthcheck migrate waits for, and
    the default GPTOSS_DATABASE_URL pointing at it with the psycopg driver and its user and database."""
    from sqlalchemy import make_url

    services = compose["services"]
    postgres = services["postgres"]
    assert re.fullmatch(r"postgres:\d+(\.\d+)?", postgres["image"])  # the official image, a major pinned
    (mount,) = postgres["volumes"]
    volume, target = str(mount).split(":")
    assert volume in compose["volumes"] and target == "/var/lib/postgresql/data"
    assert all(volume not in str(v) for name in SERVICES for v in services[name]["volumes"])
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in SERVICES:
        default = re.fullmatch(
            r"\$\{GPTOSS_DATABASE_URL:-(.+)\}", services[name]["environment"]["GPTOSS_DATABASE_URL"]
        )
        assert default, "GPTOSS_DATABASE_URL can be overridden from the environment"
        url = make_url(default.group(1))
        env = postgres["environment"]
        assert (url.drivername, url.host, url.port) == ("postgresql+psycopg", "postgres", 5432)
        assert (url.username, url.password, url.database) == (
            env["POSTGRES_USER"],
            env["POSTGRES_PASSWORD"],
            env["POSTGRES_DB"],
        )
    assert "ports" not in postgres  # reachable only on the compose network
    assert importlib.util.find_spec("psycopg") is not None  # the driver the URL names is a dependency


def _reserved_gpus(service: dict[str, Any]) -> list[str]:
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    return [str(d) for device in devices for d in device.get("device_ids", [])]


def test_one_worker_per_gpu(compose: dict[str, Any]) -> None:
    """Each worker service reserves one GPU of its own (a container sees it as cuda:0), runs the same
    worker on the same data volume and database, and the extra ones are opt-in profiles."""
    services = compose["services"]
    workers = {name: s for name, s in services.items() if name == "worker" or name.startswith("worker-gpu")}
    assert len(workers) >= 2
    gpus = {name: _reserved_gpus(service) for name, service in workers.items()}
    assert all(len(ids) == 1 for ids in gpus.values()), gpus
    assert len({ids[0] for ids in gpus.values()}) == len(workers), f"one GPU each: {gpus}"
    for name, service in workers.items():
        assert _command(service) == _command(services["worker"])
        assert service["volumes"] == services["worker"]["volumes"]
        assert service["environment"] == services["worker"]["environment"]
        if name != "worker":
            assert service["profiles"] == [f"gpu{gpus[name][0]}"] and name == f"worker-gpu{gpus[name][0]}"


def test_api_port_matches_the_image(compose: dict[str, Any], dockerfile: list[tuple[str, str]]) -> None:
    api = compose["services"]["api"]
    container_ports = {str(p).rsplit(":", 1)[-1] for p in api["ports"]}
    exposed = {arg for kind, arg in dockerfile if kind == "EXPOSE"}
    command = _command(api)
    assert container_ports == exposed == {command[command.index("--port") + 1]}
    assert command[command.index("--host") + 1] == "0.0.0.0"  # reachable through the published port


# --- Dockerfile --------------------------------------------------------------------------------------


def test_image_is_cuda_and_runs_as_a_user(dockerfile: list[tuple[str, str]]) -> None:
    base = next(arg for kind, arg in dockerfile if kind == "FROM")
    image = base.replace("${CUDA_IMAGE}", _args(dockerfile).get("CUDA_IMAGE", ""))
    assert image.startswith("nvidia/cuda:")
    users = [arg for kind, arg in dockerfile if kind == "USER"]
    assert users and users[-1] not in ("root", "0")


def test_healthcheck_probes_healthz(dockerfile: list[tuple[str, str]]) -> None:
    from app.api.routes.health import router

    check = next(arg for kind, arg in dockerfile if kind == "HEALTHCHECK")
    assert "/healthz" in check
    assert "/healthz" in {getattr(route, "path", None) for route in router.routes}


def test_pinned_gpu_stack_is_what_unsloth_accepts(dockerfile: list[tuple[str, str]]) -> None:
    args = _args(dockerfile)
    deps = {Requirement(d).name: Requirement(d) for d in _pyproject()["project"]["dependencies"]}
    gpu = {
        Requirement(d).name: Requirement(d) for d in _pyproject()["project"]["optional-dependencies"]["gpu"]
    }
    torch = Version(args["TORCH_VERSION"])
    assert torch in deps["torch"].specifier and torch in SpecifierSet("<2.15")
    for name, most in (("transformers", "5.17.0"), ("trl", "1.15.0")):
        assert all(Version(s.version) <= Version(most) for s in deps[name].specifier), name
    assert deps["datasets"].specifier.contains("4.8.5") and not deps["datasets"].specifier.contains("5.0.0")
    assert {"unsloth", "bitsandbytes"} <= set(gpu)
    assert any(kind == "RUN" and '".[gpu]"' in arg for kind, arg in dockerfile)
    assert any(kind == "RUN" and "torch==${TORCH_VERSION}" in arg for kind, arg in dockerfile)
    # Later installs are held to that torch (Unsloth's xformers/torchao could otherwise replace it).
    env = " ".join(arg for kind, arg in dockerfile if kind == "ENV")
    assert "PIP_CONSTRAINT=/opt/torch-constraints.txt" in env
    assert any(
        kind == "RUN" and "torch==%s" in arg and "/opt/torch-constraints.txt" in arg
        for kind, arg in dockerfile
    )


def test_command_matches_the_compose_api(compose: dict[str, Any], dockerfile: list[tuple[str, str]]) -> None:
    import json

    cmd = json.loads(next(arg for kind, arg in dockerfile if kind == "CMD"))
    assert cmd == _command(compose["services"]["api"])


def test_copied_paths_exist_and_are_not_ignored(dockerfile: list[tuple[str, str]]) -> None:
    ignored = _dockerignore()
    for kind, arg in dockerfile:
        if kind != "COPY":
            continue
        *sources, _dest = arg.split()
        for source in sources:
            assert (ROOT / source).exists(), f"Dockerfile copies {source}, which is not in the repository"
            assert source.rstrip("/") not in ignored, f".dockerignore drops {source}, which the image needs"


def _dockerignore() -> set[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return {line.strip().rstrip("/") for line in lines if line.strip() and not line.startswith("#")}


def test_dockerignore_keeps_local_state_and_secrets_out() -> None:
    assert {".git", ".venv", "data", ".env"} <= _dockerignore()
