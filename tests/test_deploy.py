"""Static checks of deploy/: no container engine runs here, so the compose file, the Prefect
project file and the Dockerfiles are checked against each other, against the repository and
against Prefect's and MLflow's own code."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"

REQUIRED_SERVICES = {"prefect-db", "prefect-server", "mlflow-db", "mlflow", "worker", "gpu-worker", "dask-scheduler", "dask-worker"}
# flow name -> (entrypoint, work pool, category tag)
DEPLOYMENTS = {
    "ingest": ("flows/ingest.py:ingest", "vimpac-cpu", "data"),
    "frames": ("flows/frames.py:frames", "vimpac-cpu", "data"),
    "tokenize": ("flows/tokenizer.py:tokenize", "vimpac-cpu", "data"),
    "tokenizer": ("flows/tokenizer.py:tokenizer", "vimpac-gpu", "training"),
    "pretrain": ("flows/pretrain.py:pretrain", "vimpac-gpu", "training"),
    "evaluate": ("flows/evaluate.py:evaluate", "vimpac-gpu", "training"),
    "pipeline": ("flows/pipeline.py:pipeline", "vimpac-gpu", "pipeline"),
}
# Executables the worker image provides (its entrypoint is `vimpac`).
IMAGE_COMMANDS = {"vimpac", "prefect", "dask", "torchrun", "python"}


# --- helpers --------------------------------------------------------------------------------

_VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value, env: dict[str, str]):
    """Compose's variable substitution (${V}, ${V:-default}, ${V-default}, $$) over a loaded file."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        name = m.group("name") or m.group("bare")
        op, arg = m.group("op"), m.group("arg")
        current = env.get(name)
        if op in (":-", "-"):
            if current is None or (op == ":-" and current == ""):
                return arg
            return current
        if op in (":?", "?"):
            if current is None or (op == ":?" and current == ""):
                raise KeyError(f"required variable {name} is not set: {arg}")
            return current
        return current or ""

    parts = value.split("$$")
    return "$".join(_VAR.sub(sub, p) for p in parts)


def variables_with_defaults(text: str) -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for m in _VAR.finditer(text.replace("$$", "")):
        name = m.group("name") or m.group("bare")
        default = m.group("arg") if m.group("op") in (":-", "-") else None
        if found.get(name) is None:
            found[name] = default
    return found


def as_list(command) -> list[str]:
    if command is None:
        return []
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def flag(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def parse_ports(entry) -> tuple[str | None, str]:
    """(host ip, rest) of a published port in short or long syntax."""
    if isinstance(entry, dict):
        return entry.get("host_ip"), f"{entry.get('published')}:{entry.get('target')}"
    text = str(entry)
    if text.startswith("["):  # [::1]:5000:5000
        ip, _, rest = text[1:].partition("]:")
        return ip, rest
    parts = text.split(":")
    if len(parts) == 3:
        return parts[0], ":".join(parts[1:])
    return None, text


def volume_source(entry) -> str | None:
    if isinstance(entry, dict):
        return entry.get("source") if entry.get("type", "volume") == "volume" else None
    parts = str(entry).split(":")
    return parts[0] if len(parts) >= 2 else None


def volume_target(entry) -> str:
    if isinstance(entry, dict):
        return entry["target"]
    parts = str(entry).split(":")
    return parts[1] if len(parts) >= 2 else parts[0]


def is_named_volume(source: str) -> bool:
    return not source.startswith(("/", ".", "~"))


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose_raw() -> dict:
    data = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), "compose.yaml: no services mapping"
    return data


@pytest.fixture(scope="module")
def compose(compose_raw) -> dict:
    """compose.yaml as Compose resolves it with no variables set (every default applies)."""
    return interpolate(compose_raw, {})


@pytest.fixture(scope="module")
def services(compose) -> dict[str, dict]:
    return compose["services"]


@pytest.fixture(scope="module")
def prefect_project() -> dict:
    data = yaml.safe_load((DEPLOY / "prefect.yaml").read_text())
    assert isinstance(data, dict), "prefect.yaml does not parse to a mapping"
    return data


@pytest.fixture(scope="module")
def worker_dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions(DEPLOY / "Dockerfile")


@pytest.fixture(scope="module")
def worker_pools(services) -> dict[str, str]:
    """pool -> service, for every service that runs `prefect worker start --pool NAME`."""
    pools = {}
    for name, svc in services.items():
        args = as_list(svc.get("entrypoint")) + as_list(svc.get("command"))
        if args[:3] == ["prefect", "worker", "start"] and flag(args, "--pool"):
            pools[flag(args, "--pool")] = name
    return pools


@pytest.fixture(scope="module")
def loaded_flows(tmp_path_factory):
    """The flow modules, imported as a worker would, with the data root in a temporary folder;
    the environment is restored afterwards."""
    saved = dict(os.environ)
    from flows.env import configure_environment

    configure_environment(tmp_path_factory.mktemp("deploy-home"))
    try:
        yield {path: importlib.import_module(path.removesuffix(".py").replace("/", "."))
               for path in {ep.split(":")[0] for ep, _, _ in DEPLOYMENTS.values()}}
    finally:
        os.environ.clear()
        os.environ.update(saved)


# --- compose.yaml ---------------------------------------------------------------------------


def test_compose_has_required_services(services):
    missing = REQUIRED_SERVICES - set(services)
    assert not missing, f"compose.yaml lacks services {sorted(missing)}"


def test_compose_builds_reference_existing_files(services):
    built = 0
    for name, svc in services.items():
        build = svc.get("build")
        if build is None:
            assert svc.get("image"), f"service {name} has neither build nor image"
            continue
        build = {"context": build} if isinstance(build, str) else build
        context = (DEPLOY / build.get("context", ".")).resolve()
        assert context.is_dir(), f"service {name}: build context {context} does not exist"
        # Compose resolves `dockerfile` against the build context, not against the compose file.
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        assert dockerfile.is_file(), f"service {name}: Dockerfile {dockerfile} does not exist"
        built += 1
    assert built, "no service is built from the repository"


def test_worker_image_services_are_built_from_the_repository(services):
    for name in ("worker", "gpu-worker", "dask-scheduler", "dask-worker"):
        build = services[name].get("build")
        assert isinstance(build, dict), f"service {name} is not built from deploy/Dockerfile"
        assert (DEPLOY / build["context"]).resolve() == ROOT, f"service {name}: context must be the repository root"
        assert (ROOT / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile", f"service {name}: dockerfile must be deploy/Dockerfile"
    # The Dask services run the same code as the worker, so they use its image.
    assert services["dask-scheduler"]["image"] == services["dask-worker"]["image"] == services["worker"]["image"]


def test_named_volumes_are_declared(compose, services):
    declared = set(compose.get("volumes") or {})
    for name, svc in services.items():
        for entry in svc.get("volumes") or []:
            source = volume_source(entry)
            if source and is_named_volume(source):
                assert source in declared, f"service {name} uses volume {source!r}, not declared under volumes:"


def test_depends_on_services_exist_and_are_healthchecked(services):
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        if isinstance(deps, list):
            deps = {d: {} for d in deps}
        for dep, spec in deps.items():
            assert dep in services, f"service {name} depends on unknown service {dep!r}"
            if (spec or {}).get("condition") == "service_healthy":
                assert services[dep].get("healthcheck"), f"{name} waits for {dep} to be healthy, but {dep} has no healthcheck"
            # A service outside every profile cannot depend on one that only a profile starts.
            dep_profiles = set(services[dep].get("profiles") or [])
            own_profiles = set(svc.get("profiles") or [])
            assert not dep_profiles or own_profiles & dep_profiles, (
                f"service {name} (profiles {sorted(own_profiles)}) depends on {dep}, which only profiles {sorted(dep_profiles)} start")


def test_ports_publish_on_loopback_only(services):
    published = 0
    for name, svc in services.items():
        for entry in svc.get("ports") or []:
            ip, _ = parse_ports(entry)
            assert ip == "127.0.0.1", f"service {name} publishes {entry!r} on {ip or 'every interface'}, not 127.0.0.1"
            published += 1
    assert published >= 2, "the Prefect and MLflow ports are not published"
    assert any(str(p).endswith(":4200:4200") for p in services["prefect-server"]["ports"])
    assert any(str(p).endswith(":5000:5000") for p in services["mlflow"]["ports"])


def test_ports_bind_address_is_one_documented_variable(compose_raw):
    for name, svc in compose_raw["services"].items():
        for entry in svc.get("ports") or []:
            assert str(entry).startswith("${BIND_ADDRESS:-127.0.0.1}:"), f"service {name}: port {entry!r} bypasses BIND_ADDRESS"


def test_gpu_worker_is_behind_a_profile_and_reserves_gpus(services):
    gpu = services["gpu-worker"]
    assert "gpu" in (gpu.get("profiles") or []), "gpu-worker must only start with --profile gpu"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices), devices
    assert "TORCH_INDEX_URL" in gpu["build"].get("args", {}), "the GPU image needs a CUDA torch index"
    assert "/cu" in gpu["build"]["args"]["TORCH_INDEX_URL"], "the GPU image's torch index is not a CUDA one"
    for name, svc in services.items():
        if name != "gpu-worker":
            assert "deploy" not in svc or "devices" not in str(svc["deploy"]), f"{name} reserves GPUs outside the gpu profile"


def test_dask_services_are_behind_a_profile_and_share_the_data_root(services):
    for name, sub in (("dask-scheduler", "scheduler"), ("dask-worker", "worker")):
        svc = services[name]
        assert "dask" in (svc.get("profiles") or []), f"{name} must only start with --profile dask"
        args = as_list(svc.get("entrypoint")) + as_list(svc.get("command"))
        assert args[:2] == ["dask", sub], f"{name} runs {args}, not `dask {sub}`"
        assert "/data" in [volume_target(v) for v in svc.get("volumes") or []], f"{name} lacks the data root at /data"
    worker_args = as_list(services["dask-worker"]["command"])
    assert "tcp://dask-scheduler:8786" in worker_args
    assert flag(as_list(services["dask-scheduler"]["command"]), "--port") == "8786"
    # frames starts a child process per shard: Dask's default daemonic workers refuse that.
    assert env_of(services["dask-worker"]).get("DASK_DISTRIBUTED__WORKER__DAEMON") == "False"


def test_worker_services_override_the_image_entrypoint(services, worker_dockerfile):
    entrypoints = [args for word, args in worker_dockerfile if word == "ENTRYPOINT"]
    assert entrypoints and yaml.safe_load(entrypoints[-1]) == ["vimpac"], "the worker image's entrypoint is expected to be vimpac"
    for name, svc in services.items():
        build = svc.get("build")
        if not (isinstance(build, dict) and build.get("dockerfile") == "deploy/Dockerfile"):
            continue
        entry = as_list(svc.get("entrypoint"))
        assert entry and entry[0] in IMAGE_COMMANDS, f"service {name}: entrypoint {entry} is not a command of the image"
        if entry == ["prefect"]:
            assert as_list(svc.get("command"))[:2] == ["worker", "start"], f"service {name}: not a Prefect worker"


def test_workers_poll_both_pools_and_reach_the_servers(services, worker_pools):
    assert set(worker_pools) == {"vimpac-cpu", "vimpac-gpu"}, worker_pools
    assert worker_pools["vimpac-gpu"] == "gpu-worker"
    prefect_port = flag(as_list(services["prefect-server"]["command"]), "--port") or "4200"
    mlflow_port = flag(as_list(services["mlflow"]["command"]), "--port")
    for name in ("worker", "gpu-worker", "dask-worker"):
        env = env_of(services[name])
        assert env.get("PREFECT_API_URL") == f"http://prefect-server:{prefect_port}/api", (name, env.get("PREFECT_API_URL"))
        assert env.get("VIMPAC_HOME") == "/data", name
        assert "/data" in [volume_target(v) for v in services[name].get("volumes") or []], f"{name} lacks the data root"
    for name in ("worker", "gpu-worker"):
        assert env_of(services[name]).get("MLFLOW_TRACKING_URI") == f"http://mlflow:{mlflow_port}", name
        args = as_list(services[name]["command"])
        # `--type process` lets the worker create its pool on first start.
        assert flag(args, "--type") == "process", f"{name}: pools are process pools"


def test_prefect_server_uses_postgres(services):
    server = services["prefect-server"]
    args = as_list(server.get("command"))
    assert args[:3] == ["prefect", "server", "start"] and flag(args, "--host") == "0.0.0.0", args
    url = env_of(server).get("PREFECT_API_DATABASE_CONNECTION_URL", "")
    assert url.startswith("postgresql+asyncpg://") and "@prefect-db:5432/" in url, url
    # The variable must be one Prefect reads.
    from prefect.settings.models.server.database import ServerDatabaseSettings

    aliases = {str(a).lower() for a in ServerDatabaseSettings.model_fields["connection_url"].validation_alias.choices}
    assert "prefect_api_database_connection_url" in aliases
    db_env = env_of(services["prefect-db"])
    assert f"{db_env['POSTGRES_USER']}:{db_env['POSTGRES_PASSWORD']}@" in url, "Prefect's database URL does not match prefect-db's user"


def test_mlflow_server_flags(services):
    mlflow = services["mlflow"]
    args = as_list(mlflow.get("command"))
    assert args[:2] == ["mlflow", "server"], args
    assert "--serve-artifacts" in args and flag(args, "--host") == "0.0.0.0" and flag(args, "--workers") == "1", args
    backend = flag(args, "--backend-store-uri") or env_of(mlflow).get("MLFLOW_BACKEND_STORE_URI", "")
    assert backend.startswith("postgresql://") and "@mlflow-db:5432/" in backend, backend
    destination = flag(args, "--artifacts-destination")
    assert destination in [volume_target(v) for v in mlflow.get("volumes") or []], "artifacts are not on a volume"
    # Every option passed must exist in the installed MLflow's `server` command.
    from mlflow.cli import server as server_command

    known = {opt for p in server_command.params for opt in (*p.opts, *p.secondary_opts)}
    unknown = [a for a in args[2:] if a.startswith("--") and a.split("=")[0] not in known]
    assert not unknown, f"mlflow server has no options {unknown}"


def test_mlflow_accepts_the_host_header_clients_send(services):
    """MLflow 3 answers 403 to Host headers outside --allowed-hosts, which replaces its default
    list: the workers' `mlflow:5000` and a browser's `127.0.0.1:5000` must both be allowed."""
    from mlflow.server.security_utils import is_allowed_host_header

    args = as_list(services["mlflow"]["command"])
    allowed = flag(args, "--allowed-hosts") or env_of(services["mlflow"]).get("MLFLOW_SERVER_ALLOWED_HOSTS")
    assert allowed, "without --allowed-hosts MLflow refuses Host: mlflow:5000"
    hosts = [h.strip() for h in allowed.split(",")]
    assert "*" not in hosts, "allowing every Host header disables MLflow's DNS-rebinding protection"
    worker_host = env_of(services["worker"])["MLFLOW_TRACKING_URI"].split("://", 1)[1].rstrip("/")
    for host in (worker_host, "127.0.0.1:5000", "localhost:5000"):
        assert is_allowed_host_header(hosts, host), f"MLflow would refuse Host: {host}"


def test_healthchecks_probe_the_right_ports(services):
    for name, port_path in (("prefect-server", "4200/api/health"), ("mlflow", "5000/health"), ("dask-scheduler", "8787/health")):
        test = " ".join(as_list(services[name]["healthcheck"]["test"]))
        assert f"localhost:{port_path}" in test, f"{name}'s healthcheck does not probe {port_path}: {test}"
    for name in ("worker", "gpu-worker"):
        assert "--with-healthcheck" in as_list(services[name]["command"]), f"{name}'s healthcheck needs the worker's health server"


def test_env_example_documents_every_variable(compose_raw):
    text = (DEPLOY / "compose.yaml").read_text()
    used = variables_with_defaults(text)
    example = {}
    for line in (DEPLOY / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            example[key.strip()] = value.strip()
    undocumented = sorted(set(used) - set(example))
    assert not undocumented, f"deploy/.env.example does not document {undocumented}"
    for name, default in used.items():
        if default is not None:
            assert example[name] == default, f".env.example says {name}={example[name]}, compose.yaml defaults to {default}"
    assert not sorted(set(example) - set(used)), f".env.example documents unused {sorted(set(example) - set(used))}"


# --- prefect.yaml ---------------------------------------------------------------------------


def test_prefect_yaml_validates_with_prefects_model(prefect_project):
    """The model `prefect deploy` loads the file with; it ignores unknown keys, so those are
    checked here: a misspelt key would otherwise vanish silently."""
    from prefect.cli.deploy._models import DeploymentConfig, PrefectYamlModel, WorkPoolConfig

    model = PrefectYamlModel.model_validate(prefect_project)
    assert len(model.deployments) == len(prefect_project["deployments"])
    top_keys = {f.alias or n for n, f in PrefectYamlModel.model_fields.items()} | set(PrefectYamlModel.model_fields)
    # `definitions` holds YAML anchors only (Prefect's documented place for them).
    unknown = set(prefect_project) - top_keys - {"definitions"}
    assert not unknown, f"prefect.yaml: keys Prefect ignores: {sorted(unknown)}"
    for d in prefect_project["deployments"]:
        unknown = set(d) - set(DeploymentConfig.model_fields)
        assert not unknown, f"deployment {d.get('flow_name')}: keys Prefect ignores: {sorted(unknown)}"
        unknown = set(d.get("work_pool") or {}) - set(WorkPoolConfig.model_fields)
        assert not unknown, f"deployment {d.get('flow_name')}: work_pool keys Prefect ignores: {sorted(unknown)}"


def test_prefect_yaml_loads_like_prefect_deploy(tmp_path):
    """The loader `prefect deploy` itself calls: it reports problems on the console and skips
    the file instead of failing."""
    from rich.console import Console

    try:
        from prefect.cli.deploy._config import _load_deploy_configs_and_actions
    except ImportError:  # a private helper: only as strong as the installed Prefect keeps it
        pytest.skip("this Prefect has no prefect.cli.deploy._config._load_deploy_configs_and_actions")
    console = Console(file=(tmp_path / "console.txt").open("w"), width=200)
    configs, actions = _load_deploy_configs_and_actions(DEPLOY / "prefect.yaml", console=console)
    console.file.close()
    output = (tmp_path / "console.txt").read_text()
    assert "Skipping" not in output and "Invalid" not in output, output
    assert len(configs) == len(DEPLOYMENTS)
    assert actions["pull"], "no pull steps"


def test_one_deployment_per_flow(prefect_project, worker_pools):
    deployments = prefect_project["deployments"]
    by_flow = {d["flow_name"]: d for d in deployments}
    assert len(by_flow) == len(deployments), "two deployments for the same flow"
    assert set(by_flow) == set(DEPLOYMENTS), f"deployments for {sorted(by_flow)}, expected {sorted(DEPLOYMENTS)}"
    for flow_name, (entrypoint, pool, category) in DEPLOYMENTS.items():
        d = by_flow[flow_name]
        assert d["name"] == "vimpac", f"{flow_name}: deployment name {d['name']!r}"
        assert d["entrypoint"] == entrypoint, f"{flow_name}: entrypoint {d['entrypoint']!r}"
        assert isinstance(d.get("description"), str) and d["description"].strip(), f"{flow_name}: no description"
        assert set(d.get("tags") or []) >= {"vimpac", category}, f"{flow_name}: tags {d.get('tags')}"
        assert d["work_pool"]["name"] == pool, f"{flow_name}: pool {d['work_pool']['name']!r}, expected {pool}"
        assert d["work_pool"]["name"] in worker_pools, f"{flow_name}: no compose worker polls {d['work_pool']['name']!r}"
        for key, value in ((d["work_pool"].get("job_variables") or {}).get("env") or {}).items():
            assert isinstance(value, str), f"{flow_name}: job variable env {key} must be a string, got {value!r}"
        assert "parameter_openapi_schema" not in d, f"{flow_name}: the schema comes from the flow's signature"


def test_entrypoints_are_prefect_flows_with_the_deployed_name(prefect_project, loaded_flows):
    from prefect import Flow

    for d in prefect_project["deployments"]:
        path, func = d["entrypoint"].split(":")
        assert (ROOT / path).is_file(), f"{d['flow_name']}: {path} does not exist"
        obj = getattr(loaded_flows[path], func, None)
        assert isinstance(obj, Flow), f"{d['entrypoint']} is not a Prefect flow"
        assert obj.name == d["flow_name"], f"{d['entrypoint']} is the flow {obj.name!r}, deployed as {d['flow_name']!r}"


def test_pull_step_enters_the_image_code(prefect_project, worker_dockerfile):
    workdirs = [args for word, args in worker_dockerfile if word == "WORKDIR"]
    assert workdirs, "the worker Dockerfile sets no WORKDIR"
    steps = prefect_project.get("pull") or []
    assert len(steps) == 1 and len(steps[0]) == 1, steps
    (step, kwargs), = steps[0].items()
    module, _, func = step.rpartition(".")
    assert callable(getattr(importlib.import_module(module), func, None)), f"pull step {step} does not exist"
    assert func == "set_working_directory" and kwargs["directory"] == workdirs[-1], (step, kwargs, workdirs)
    # The entrypoints are relative to that folder: their files must be copied there.
    copied = {args.split()[-1].removeprefix("./").rstrip("/") for word, args in worker_dockerfile if word == "COPY"}
    for d in prefect_project["deployments"]:
        top = d["entrypoint"].split("/")[0]
        assert top in copied, f"{d['entrypoint']}: {top}/ is not copied into {workdirs[-1]}"
    for d in prefect_project["deployments"]:
        assert "pull" not in d, f"{d['flow_name']} overrides the pull step"


# --- Dockerfiles ----------------------------------------------------------------------------


def test_dockerfile_copy_sources_exist_and_are_in_the_build_context(worker_dockerfile):
    ignore = [line.strip() for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*", "Dockerfile.dockerignore is expected to exclude everything, then list what is sent"
    included = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copies = [args.split() for word, args in worker_dockerfile if word == "COPY"]
    assert copies, "the Dockerfile copies nothing"
    for args in copies:
        assert not any(a.startswith("--from") for a in args), args
        for source in args[:-1]:
            if source.startswith("--"):
                continue
            assert (ROOT / source).exists(), f"COPY source {source} does not exist in the repository"
            assert source.rstrip("/") in included, f"COPY source {source} is excluded by Dockerfile.dockerignore"


def test_dockerfile_installs_the_project_and_dask(worker_dockerfile):
    runs = " ".join(args for word, args in worker_dockerfile if word == "RUN")
    assert re.search(r"pip install (\S+ )*\.( |$)", runs), "the Dockerfile does not pip install the project"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = " ".join(project["dependencies"])
    assert "prefect-dask" in runs or "prefect-dask" in deps, "the image lacks prefect-dask (compose's Dask services)"
    assert project["scripts"].get("vimpac"), "the image's entrypoint `vimpac` is not a project script"
    # compose runs `dask scheduler` and `dask worker`: the `dask` command belongs to dask, its
    # `scheduler` and `worker` subcommands to distributed, which prefect-dask requires.
    try:
        requires = importlib.metadata.requires("prefect-dask") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("prefect-dask is not installed here")
    assert any(re.match(r"distributed\b", r) for r in requires), requires
    assert any(re.match(r"dask\b", r) for r in importlib.metadata.requires("distributed") or [])
    scripts = {ep.name for ep in importlib.metadata.distribution("dask").entry_points if ep.group == "console_scripts"}
    assert "dask" in scripts, scripts
    subcommands = {ep.name for ep in importlib.metadata.distribution("distributed").entry_points if ep.group == "dask_cli"}
    assert {"scheduler", "worker"} <= subcommands, subcommands


def test_torch_is_installed_before_the_project(worker_dockerfile):
    """The project asks for torch>=2.4: installed first from the chosen index, pip keeps it
    instead of pulling a default CUDA build from PyPI."""
    runs = [args for word, args in worker_dockerfile if word == "RUN"]
    torch_at = next(i for i, r in enumerate(runs) if "TORCH_INDEX_URL" in r)
    project_at = next(i for i, r in enumerate(runs) if re.search(r"pip install (\S+ )*\.( |$)", r))
    assert torch_at < project_at
    args = {args.split("=")[0] for word, args in worker_dockerfile if word == "ARG"}
    assert "TORCH_INDEX_URL" in args, "compose's gpu-worker passes TORCH_INDEX_URL as a build arg"


def test_mlflow_image_has_the_postgres_driver():
    runs = " ".join(args for word, args in dockerfile_instructions(DEPLOY / "mlflow.Dockerfile") if word == "RUN")
    assert "mlflow==" in runs and "psycopg2" in runs, runs


def test_readme_links_exist():
    text = (DEPLOY / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if "://" not in target:
            assert (DEPLOY / target).resolve().exists(), f"deploy/README.md links to missing {target}"
    for path in re.findall(r"\bdeploy/[\w.\-]+", text):
        if not path.endswith("/.env"):
            assert (ROOT / path).exists(), f"deploy/README.md names missing {path}"
