"""Offline checks of the infrastructure recipes.

`ray_cluster.yaml` goes through Ray's own cluster-launcher validation (the steps `ray up` takes before it
contacts the cloud); the KubeRay job, the Dockerfiles and the MLflow server recipes are checked for
structure, since there is no Kubernetes API or Docker daemon here. Nothing contacts AWS: the Ray checks run
with sockets disabled.
"""

from __future__ import annotations

import copy
import re
import shlex
import socket
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
CLUSTER_FILE = ROOT / "ray_cluster.yaml"
RAYJOB_FILE = INFRA / "kuberay" / "rayjob.yaml"
COMPOSE_FILE = INFRA / "mlflow" / "docker-compose.yaml"
MLFLOW_K8S_FILE = INFRA / "mlflow" / "k8s.yaml"
INSTALL_SCRIPT = INFRA / "install_project.sh"

# GPUs per instance type, for the instance types a config may name (AWS's published counts).
AWS_GPUS = {
    "g4dn.xlarge": 1,
    "g4dn.12xlarge": 4,
    "g5.xlarge": 1,
    "g5.2xlarge": 1,
    "g5.12xlarge": 4,
    "g5.48xlarge": 8,
    "g6.xlarge": 1,
    "g6e.xlarge": 1,
    "p3.2xlarge": 1,
    "p3.16xlarge": 8,
    "p4d.24xlarge": 8,
    "p5.48xlarge": 8,
}
# Ray's tag scheme: {ray version}-{python}-{platform}; gpu aliases Ray's default CUDA build (cuXXX).
RAY_IMAGE = re.compile(r"^rayproject/ray:(?P<version>[\d.]+)-(?P<python>py3\d+)-(?P<platform>gpu|cpu|cu\d+)$")


def pinned_ray_version() -> str:
    """The Ray version pyproject.toml pins (`ray[...]==X`)."""
    match = re.search(r'"ray(?:\[[^\]]*\])?==([0-9][0-9a-z.]*)"', (ROOT / "pyproject.toml").read_text())
    assert match, "pyproject.toml must pin ray with == (the images are chosen to match it)"
    return match.group(1)


def load_docs(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def one_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def cluster_config() -> dict[str, Any]:
    (config,) = load_docs(CLUSTER_FILE)
    return config


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to resolve a name or open a connection fails the test."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture
def prepared_cluster(no_network: None, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """ray_cluster.yaml as `ray up` prepares it, before any cloud call: merged with Ray's AWS defaults
    (fillout_defaults), setup commands merged, the docker section checked (validate_docker_config),
    per-type min/max workers filled in; then checked against Ray's JSON schema and its cross-field rules
    (validate_config). Raises on anything Ray would refuse."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    monkeypatch.chdir(ROOT)  # `ray up` runs from the repository root: file_mounts are relative to it
    prepared = prepare_config(copy.deepcopy(cluster_config()))
    validate_config(prepared)
    return prepared


# ----------------------------------------------------------------------------------------------------------
# ray_cluster.yaml
# ----------------------------------------------------------------------------------------------------------


def test_cluster_config_passes_rays_validation(prepared_cluster: dict[str, Any]) -> None:
    assert prepared_cluster["provider"]["type"] == "aws"
    assert prepared_cluster["head_node_type"] in prepared_cluster["available_node_types"]
    # prepare_config put the common setup commands in front of the head's and the workers' own
    common = prepared_cluster["setup_commands"]
    assert common and prepared_cluster["worker_setup_commands"][: len(common)] == common


def first_gpu_type(config: dict[str, Any]) -> dict[str, Any]:
    return next(t for t in config["available_node_types"].values() if t["resources"].get("GPU"))


def typo_in_a_key(config: dict[str, Any]) -> None:
    config["idle_timeout_minute"] = 5


def fractional_gpus(config: dict[str, Any]) -> None:
    first_gpu_type(config)["resources"]["GPU"] = 0.5


def min_workers_above_the_cluster_max(config: dict[str, Any]) -> None:
    first_gpu_type(config)["min_workers"] = config["max_workers"] + 1


@pytest.mark.parametrize(
    ("breakage", "error"),
    [
        (typo_in_a_key, "Additional properties are not allowed"),
        (fractional_gpus, "is not of type 'integer'"),
        (min_workers_above_the_cluster_max, "smaller than the sum of `min_workers`"),
    ],
)
def test_rays_validation_refuses_broken_variants(
    no_network: None, monkeypatch: pytest.MonkeyPatch, breakage: Any, error: str
) -> None:
    """The same validation refuses broken copies of the file, so its passing above means something."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    monkeypatch.chdir(ROOT)
    config = copy.deepcopy(cluster_config())
    breakage(config)
    with pytest.raises(Exception, match=re.escape(error)):
        validate_config(prepare_config(config))


def test_cluster_node_types_declare_resources_and_bounds(prepared_cluster: dict[str, Any]) -> None:
    config = cluster_config()
    types = prepared_cluster["available_node_types"]
    head = types[prepared_cluster["head_node_type"]]
    assert head["max_workers"] == 0
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    assert config["idle_timeout_minutes"] > 0, "idle workers (GPUs) must be released"

    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu_types, "at least one GPU worker type"
    for name, node_type in types.items():
        instance = node_type["node_config"]["InstanceType"]
        if instance in AWS_GPUS or instance[0] in "gp":  # the g* and p* families are the NVIDIA GPU ones
            assert instance in AWS_GPUS, f"{name}: add {instance}'s GPU count to AWS_GPUS"
            assert node_type["resources"].get("GPU") == AWS_GPUS[instance], (
                f"{name} ({instance}): declare GPU: {AWS_GPUS[instance]} so the autoscaler can plan for it"
            )
        assert node_type["resources"].get("CPU") is not None, f"{name}: declare CPU"
        if name == prepared_cluster["head_node_type"]:
            continue
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= config["max_workers"], name
    for name, node_type in gpu_types.items():
        assert node_type["min_workers"] == 0, f"{name}: idle GPU nodes cost money; scale from zero"
    assert sum(t.get("min_workers", 0) for t in types.values()) <= config["max_workers"]


def test_cluster_nodes_use_instance_profiles_and_an_explicit_ami(prepared_cluster: dict[str, Any]) -> None:
    for name, node_type in prepared_cluster["available_node_types"].items():
        node_config = node_type["node_config"]
        assert node_config.get("ImageId"), f"{name}: set ImageId (Ray's default is an Ubuntu 18.04 DLAMI)"
        arn = node_config.get("IamInstanceProfile", {}).get("Arn", "")
        assert re.fullmatch(r"arn:aws:iam::(\d{12}|<ACCOUNT_ID>):instance-profile/[\w+=,.@-]+", arn), (
            f"{name}: S3 access comes from an IAM instance profile, got {arn!r}"
        )
        assert node_config.get("MetadataOptions", {}).get("HttpTokens") == "required", f"{name}: IMDSv2"


def test_cluster_file_mounts_and_setup_install_the_project(prepared_cluster: dict[str, Any]) -> None:
    mounts = prepared_cluster["file_mounts"]
    for remote, local in mounts.items():
        assert (ROOT / local).exists(), f"file_mounts {remote}: {local} does not exist in the repository"
        assert not Path(local).is_absolute(), f"{local}: keep local paths relative to the repository"
    mounted = {Path(local).as_posix() for local in mounts.values()}  # "./pix2pix" → "pix2pix", "." stays
    for needed in ("pyproject.toml", "README.md", "pix2pix", "pipelines", "bench", "infra"):
        assert needed in mounted, f"pip install on the nodes needs {needed} mounted"
    assert not any(m in {".", ".venv", "runs", "mlruns"} for m in mounted), "never mount the whole checkout"
    setup = " ".join(prepared_cluster["setup_commands"])
    assert "install_project.sh" in setup
    env = " ".join(prepared_cluster["docker"]["run_options"])
    assert f"AWS_REGION={prepared_cluster['provider']['region']}" in env
    assert "NO_ALBUMENTATIONS_UPDATE=1" in env


def test_install_script_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(INSTALL_SCRIPT)], check=True)
    text = INSTALL_SCRIPT.read_text()
    assert "import torch" in text and "-c " in text, "keeps the image's torch and pins it as a constraint"


# ----------------------------------------------------------------------------------------------------------
# Images: one Ray version everywhere, the one pyproject.toml pins
# ----------------------------------------------------------------------------------------------------------


def dockerfile_base_image(path: Path) -> str:
    """The FROM image with the ARG defaults declared before it substituted."""
    args: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if m := re.match(r"ARG\s+(\w+)=(\S+)", line):
            args[m.group(1)] = m.group(2).strip("\"'")
        if m := re.match(r"FROM\s+(\S+)", line):
            return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda v: args[v.group(1) or v.group(2)], m.group(1))
    raise AssertionError(f"{path}: no FROM line")


def test_images_match_the_pinned_ray_version() -> None:
    version = pinned_ray_version()
    docker = cluster_config()["docker"]
    images = [docker[key] for key in ("image", "head_image", "worker_image") if key in docker]
    images.append(dockerfile_base_image(INFRA / "Dockerfile"))
    for image in images:
        match = RAY_IMAGE.match(image)
        assert match, f"{image}: expected rayproject/ray:<version>-py3XX-<gpu|cpu|cuXXX>"
        assert match["version"] == version, f"{image}: Ray {match['version']}, pyproject pins {version}"
    assert {RAY_IMAGE.match(i)["python"] for i in images} == {"py311"}  # type: ignore[index]
    assert RAY_IMAGE.match(images[0])["platform"] != "cpu", "GPU workers need a CUDA image"  # type: ignore[index]

    cluster_spec = one_kind(load_docs(RAYJOB_FILE), "RayJob")["spec"]["rayClusterSpec"]
    assert cluster_spec["rayVersion"] == version
    for container in pod_containers(cluster_spec):
        assert f"ray{version}" in container["image"], f"{container['image']}: tag the image with its Ray"


def test_dockerfile_keeps_torch_runs_as_non_root_and_has_no_secrets() -> None:
    text = (INFRA / "Dockerfile").read_text()
    assert re.search(r"^ENV\s[^#]*NO_ALBUMENTATIONS_UPDATE=1", text, re.M)
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in {"root", "0"}, "the image must end as a non-root user"
    assert users[-1].isdigit(), "numeric USER, so Kubernetes' runAsNonRoot can verify it"
    assert re.search(r"^WORKDIR\s+/home/ray/\S+", text, re.M)
    assert "install_project.sh" in text, "installs through the script that keeps the image's torch"
    assert not re.search(r"pip install[^\n]*\btorch\b", text), "torch is never reinstalled directly"
    for source in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+?)\s+\S+$", text, re.M):
        for path in source.split():
            assert (ROOT / path).exists(), f"COPY {path}: not in the repository (the build context)"


def test_dockerignore_keeps_environments_and_outputs_out() -> None:
    patterns = {
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if not line.startswith("#")
    }
    for needed in (".venv", "runs", "mlruns", ".git", "**/__pycache__", ".mypy_cache", ".pytest_cache"):
        assert needed in patterns, f".dockerignore must exclude {needed}"


# ----------------------------------------------------------------------------------------------------------
# infra/: every YAML parses; the KubeRay job; the MLflow server
# ----------------------------------------------------------------------------------------------------------


def test_every_yaml_file_parses() -> None:
    files = [CLUSTER_FILE, *sorted(INFRA.rglob("*.yaml")), *sorted(INFRA.rglob("*.yml"))]
    assert RAYJOB_FILE in files and COMPOSE_FILE in files and MLFLOW_K8S_FILE in files
    for path in files:
        docs = load_docs(path)
        assert docs and all(isinstance(d, dict) for d in docs), path


def pod_containers(cluster_spec: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def job_steps(entrypoint: str) -> list[list[str]]:
    """The p2p commands of the entrypoint's `bash -c` script, split into arguments."""
    words = shlex.split(entrypoint)
    assert words[:2] in (["bash", "-c"], ["sh", "-c"]) and len(words) == 3, (
        "KubeRay pastes the entrypoint into the submitter's shell: the chain must be one `bash -c '...'`"
    )
    script = words[2]
    subprocess.run(["bash", "-n", "-c", script], check=True)
    steps = [shlex.split(part) for part in re.split(r"&&|;", script)]
    return [s for s in steps if s and s[0] == "p2p"]


def test_rayjob_runs_build_train_promote_on_gpu_workers() -> None:
    docs = load_docs(RAYJOB_FILE)
    job = one_kind(docs, "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0

    # the pipeline: build → train --register-as NAME → promote NAME --candidate ..., each parsed by p2p itself
    steps = job_steps(spec["entrypoint"])
    verbs = [" ".join(step[1:3]) if step[1] == "dataset" else step[1] for step in steps]
    assert verbs == ["dataset build", "train", "promote"], verbs
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    used = set(re.findall(r"\$\{?(\w+)", spec["entrypoint"]))
    assert used <= set(env), f"variables the job uses but runtimeEnvYAML does not set: {used - set(env)}"
    from pipelines.cli import build_parser

    parser = build_parser()
    parsed = []
    for step in steps:
        argv = [re.sub(r"\$\{?(\w+)\}?", lambda m: str(env[m.group(1)]), a) for a in step[1:]]
        try:
            parsed.append(parser.parse_args(argv))
        except SystemExit:
            pytest.fail(f"`p2p {' '.join(argv)}` does not parse with the p2p command")
    build, train, promote = (vars(p) for p in parsed)  # flags land on their config field paths
    assert train["data.manifest"] == build["output"], "train reads the dataset the build wrote"
    register_as = train["mlflow.register_as"]
    assert register_as and promote["name"] == register_as, "promote the model train registered"
    assert promote["candidate"] == "latest"
    assert "use_gpu=true" in train["set"], "GPU pods start at zero: the default would train on CPUs"
    assert train["global_batch_size"] % train["workers"] == 0, "the global batch splits over the workers"

    cluster_spec = spec["rayClusterSpec"]
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    for group in groups:
        for key, value in group.get("rayStartParams", {}).items():
            assert isinstance(value, str), f"rayStartParams.{key}: KubeRay needs strings, got {value!r}"
    gpu_groups = []
    # The CPUs each training worker asks for (its loader workers follow them) must fit on a GPU pod.
    sets = dict(item.split("=", 1) for item in train["set"])
    cpus_per_worker = float(sets.get("cpus_per_worker", 1))
    for group in cluster_spec["workerGroupSpecs"]:
        name = group["groupName"]
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], name
        (container,) = group["template"]["spec"]["containers"]
        gpus = int(container["resources"].get("limits", {}).get("nvidia.com/gpu", 0))
        if gpus:
            gpu_groups.append(name)
            assert int(container["resources"]["requests"]["nvidia.com/gpu"]) == gpus
            assert cpus_per_worker <= float(container["resources"]["requests"]["cpu"]), name
    assert gpu_groups, "a worker group must request nvidia.com/gpu"
    assert int(train["workers"] or 0) <= sum(
        g["maxReplicas"] for g in cluster_spec["workerGroupSpecs"] if g["groupName"] in gpu_groups
    ), "train asks for more GPU workers than the GPU groups can grow to"

    # S3 through IRSA: every pod runs as the annotated ServiceAccount; no credentials in the manifest
    account = one_kind(docs, "ServiceAccount")
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    for group in groups:
        assert group["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]
    for container in pod_containers(cluster_spec):
        names = {e["name"] for e in container.get("env", [])}
        assert "MLFLOW_TRACKING_URI" in names and "AWS_REGION" in names
        assert not any(n.startswith("AWS_") and ("KEY" in n or "SECRET" in n) for n in names)


def allowed(host: str, patterns: list[str]) -> bool:
    """MLflow's own Host-header rule, as its server applies it."""
    from mlflow.server.security_utils import is_allowed_host_header

    return is_allowed_host_header(patterns, host)


def test_mlflow_compose_uses_postgres_s3_and_file_secrets() -> None:
    (compose,) = load_docs(COMPOSE_FILE)
    services = compose["services"]
    assert {"postgres", "mlflow"} <= set(services)
    server = services["mlflow"]
    command = " ".join(server["command"])
    # The database URI (with its password) goes to the server through its environment, which MLflow reads
    # for --backend-store-uri: a command line is visible to every user of the host (`ps`).
    assert 'export MLFLOW_BACKEND_STORE_URI="postgresql://' in command
    assert "--backend-store-uri" not in command
    assert "--artifacts-destination" in command and "--serve-artifacts" in command
    assert services["mlflow"]["environment"]["MLFLOW_ARTIFACTS_DESTINATION"].startswith("${")
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "healthcheck" in services["postgres"]
    # the password comes from a secret file, for both containers
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD_FILE"].startswith("/run/secrets/")
    assert "POSTGRES_PASSWORD" not in services["postgres"]["environment"]
    assert set(services["postgres"]["secrets"]) == set(server["secrets"]) == set(compose["secrets"])
    for secret in compose["secrets"].values():
        assert secret["file"].startswith("${"), "the secret's file is named by a variable: outside the repo"
    assert "ports" not in services["postgres"], "only the server reaches the database"

    # the name ray_cluster.yaml gives the server passes MLflow's Host check with the default allowed hosts
    run_options = " ".join(cluster_config()["docker"]["run_options"])
    uri = re.search(r"MLFLOW_TRACKING_URI=(\S+)", run_options)
    assert uri, "ray_cluster.yaml sets MLFLOW_TRACKING_URI"
    default_hosts = re.fullmatch(r"\$\{\w+:-(.*)\}", server["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"])
    assert default_hosts
    hosts = default_hosts.group(1).split(",")
    assert allowed(urlparse(uri.group(1)).netloc, hosts)
    # private addresses (a Docker bridge is 172.17/16) pass; public ones, 172.32 and above too, do not
    for host in ("localhost:5000", "10.0.3.4:5000", "172.16.0.1:5000", "172.31.255.1", "192.168.1.2:80"):
        assert allowed(host, hosts), host
    for host in ("172.32.0.1:5000", "172.15.0.1", "172.1.2.3:5000", "8.8.8.8:5000", "evil.example:5000"):
        assert not allowed(host, hosts), host


def test_mlflow_k8s_server_is_reachable_at_the_rayjobs_tracking_uri() -> None:
    docs = load_docs(MLFLOW_K8S_FILE)
    deployment, service = one_kind(docs, "Deployment"), one_kind(docs, "Service")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert "--serve-artifacts" in args
    assert any(a.startswith("--artifacts-destination=s3://") for a in args)
    env = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"], "the DB URI comes from a Secret"
    account = one_kind(docs, "ServiceAccount")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]
    assert "eks.amazonaws.com/role-arn" in account["metadata"]["annotations"]

    # the RayJob's MLFLOW_TRACKING_URI names this Service, on its port, and passes the Host check
    cluster_spec = one_kind(load_docs(RAYJOB_FILE), "RayJob")["spec"]["rayClusterSpec"]
    envs = [e for c in pod_containers(cluster_spec) for e in c["env"]]
    (uri,) = {e["value"] for e in envs if e["name"] == "MLFLOW_TRACKING_URI"}
    netloc = urlparse(uri).netloc
    host, port = netloc.rsplit(":", 1)
    meta = service["metadata"]
    assert host.split(".")[:2] == [meta["name"], meta["namespace"]], f"{uri}: not the Service {meta['name']}"
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}
    (hosts,) = [a.split("=", 1)[1] for a in args if a.startswith("--allowed-hosts=")]
    assert allowed(netloc, hosts.split(",")), f"MLflow would answer 403 to Host {netloc}"
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


# ----------------------------------------------------------------------------------------------------------
# No credentials in any infra file
# ----------------------------------------------------------------------------------------------------------

SECRET_PATTERNS = {
    "AWS secret key name": re.compile(r"aws_secret_access_key", re.I),
    "AWS access key name": re.compile(r"aws_access_key_id", re.I),
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    # user:password@ in a URI, unless the password is a $variable or $(command)
    "credentials in a URI": re.compile(r"://[\w.%-]+:(?![$<])[^@\s/'\"]+@"),
    # PASSWORD=..., password: ..., *_TOKEN=... with a literal value (not a $var, <placeholder> or path)
    "literal password or token": re.compile(
        r"\b\w*(?:PASSWORD|PASSWD|SECRET|TOKEN)\s*[:=]\s*['\"]?(?![$<{/])[A-Za-z0-9+/=_-]{8,}", re.I
    ),
}


def infra_files() -> list[Path]:
    return [CLUSTER_FILE, ROOT / ".dockerignore", *sorted(p for p in INFRA.rglob("*") if p.is_file())]


def find_secrets(text: str) -> list[str]:
    return [name for name, pattern in SECRET_PATTERNS.items() if pattern.search(text)]


def test_secret_detector_catches_what_it_should() -> None:
    key_id = "AKIA" + "ABCDEFGHIJKLMNOP"
    assert find_secrets(f"id: {key_id}") == ["AWS access key id"]
    assert find_secrets("uri: postgresql://mlflow:hunter2hunter2@db:5432/mlflow") == ["credentials in a URI"]
    assert find_secrets("POSTGRES_PASSWORD: hunter2hunter2") == ["literal password or token"]
    assert find_secrets("aws_secret_access_key = x") == ["AWS secret key name"]
    assert not find_secrets('--backend-store-uri "postgresql://mlflow:$$(cat /run/secrets/pw)@db/mlflow"')
    assert not find_secrets("POSTGRES_PASSWORD_FILE: /run/secrets/mlflow_db_password")


def test_no_secrets_in_infra_files() -> None:
    files = infra_files()
    assert INFRA / "README.md" in files and INFRA / "Dockerfile" in files
    found = {str(p.relative_to(ROOT)): hits for p in files if (hits := find_secrets(p.read_text()))}
    assert not found, f"credentials (or credential settings) in infra files: {found}"
