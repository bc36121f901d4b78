"""The cluster manifests, the image and the pins agree with each other and with the code.

Every YAML under ``cluster/`` is loaded. KubeRay resources validate against the CRD schemas of
the pinned KubeRay (vendored in ``tests/data/``; an unknown field is an error, as with
``kubectl apply --validate=strict``), the launcher config against the schema the installed Ray
ships. Then what no schema knows: every path an entrypoint or a doc names exists (and is in
the image), every pipeline is registered, every inline config is a valid ``ExtractConfig``
(``--set`` overrides included), every image is the Dockerfile's at the Makefile's tag, Ray and
Python versions match the environment, nothing is pip-installed at start, every pod has the
S3 service account and region, and each RayJob's cluster can hold its config.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import pathlib
import re
import shlex
import sys
from collections.abc import Iterator

import pytest
import ray
import torch
import yaml

jsonschema = pytest.importorskip("jsonschema")
tomllib = pytest.importorskip("tomllib")  # Python ≥ 3.11, as the image and the venv

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
CRDS = pathlib.Path(__file__).parent / "data" / "kuberay-v1.7.0"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.v1.json", "RayJob": "ray.io_rayjobs.v1.json",
             "RayCronJob": "ray.io_raycronjobs.v1.json"}
# KubeRay 1.7.0, ray-operator/controllers/ray/utils/constant.go
MAX_NAME = {"RayCluster": 53, "RayJob": 47, "RayCronJob": 36}
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
PIP_INSTALL = re.compile(r"\b(pip3?|uv pip|conda|mamba)\s+install\b")
RUNTIME_ENV_INSTALLS = {"pip", "conda", "uv", "container", "image_uri", "py_executable"}
REPO_PATH = re.compile(
    r"(?<![\w/.-])((?:jobs|pipelines|cluster|engram_ray|tests|docs|scripts)/[\w./-]*\w)")

YAML_FILES = sorted(CLUSTER.rglob("*.yaml")) + sorted(CLUSTER.rglob("*.yml"))


# --- what the repository pins -------------------------------------------------------------

def makefile_var(name: str) -> str:
    m = re.search(rf"^{name}\s*\?=\s*(\S+)\s*$", (ROOT / "Makefile").read_text(), re.M)
    assert m, f"Makefile has no {name} ?= …"
    return m.group(1)


def dockerfile() -> dict:
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln.strip() for ln in re.sub(r"\\\n", " ", text).splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    instr = [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]
    args = dict(v.split("=", 1) for k, v in instr if k == "ARG" and "=" in v)
    return {"from": [v for k, v in instr if k == "FROM"], "args": args,
            "workdir": [v for k, v in instr if k == "WORKDIR"][-1],
            "copy": [v.split() for k, v in instr if k == "COPY"],
            "run": " ".join(v for k, v in instr if k == "RUN" and "pip install" in v),
            "text": text}


IMAGE = makefile_var("IMAGE")
DOCKER = dockerfile()
APP_DIR = DOCKER["workdir"]  # where the image holds the repository


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_dockerfile_base_and_pins_match_the_environment():
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert DOCKER["from"] == [f"rayproject/ray:{ray.__version__}-{py}-cpu"]
    assert DOCKER["args"]["TORCH_PIN"] == makefile_var("TORCH_PIN")
    assert makefile_var("TORCH_PIN") == f"torch=={torch.__version__.split('+')[0]}"
    assert DOCKER["args"]["RAY_PIN"] == f"ray[default]=={ray.__version__}"
    assert f"ray.__version__ == '{ray.__version__}'" in DOCKER["run"]
    # torch first and alone, then the project's cluster extra with torch and Ray held.
    first, second = DOCKER["run"].split("&&")[:2]
    assert '"$TORCH_PIN"' in first and ".[cluster]" not in first
    assert all(p in second for p in ('"$TORCH_PIN"', '"$RAY_PIN"', '".[cluster]"'))
    assert not re.search(r"-e\s|--editable", DOCKER["run"])


def test_image_tag_is_the_project_and_ray_version():
    assert IMAGE.endswith(f":{project_version()}-ray{ray.__version__}")
    assert re.fullmatch(r"[a-z0-9.-]+(/[a-z0-9._-]+)+:[\w.-]+", IMAGE), IMAGE


def test_cluster_extra_brings_the_job_server():
    from packaging.requirements import Requirement

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in meta["optional-dependencies"]["cluster"]]
    ray_req = [r for r in reqs if r.name == "ray"]
    assert ray_req and "default" in ray_req[0].extras
    assert ray_req[0].specifier.contains(ray.__version__)
    # ray[default] is installed here: the dashboard and its job server can run.
    importlib.import_module("aiohttp")
    importlib.import_module("ray.dashboard.modules.job.job_head")
    assert re.search(r'-e "\.\[[a-z,]*cluster[a-z,]*\]"', (ROOT / "Makefile").read_text())


def test_image_holds_what_the_jobs_need():
    copied = set()
    for parts in DOCKER["copy"]:
        sources = [p for p in parts if not p.startswith("--")][:-1]
        copied |= {src.rstrip("/") for src in sources}
    for need in ("pyproject.toml", "README.md", "engram_ray", "pipelines", "jobs"):
        assert need in copied, f"Dockerfile does not COPY {need}"
    ignored = {ln.strip().rstrip("/") for ln in (ROOT / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")}
    assert not ignored & copied, f".dockerignore drops {ignored & copied}"


# --- loading the manifests ----------------------------------------------------------------

def documents() -> Iterator[tuple[str, dict]]:
    for path in YAML_FILES:
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                yield f"{path.relative_to(ROOT)}#{i}", doc


DOCS = dict(documents())
KUBE = {k: d for k, d in DOCS.items() if "kind" in d}
RAY_KINDS = {k: d for k, d in KUBE.items() if d["kind"] in CRD_FILES}
LAUNCHERS = {k: d for k, d in DOCS.items() if "cluster_name" in d and "provider" in d}
QUEUES = {k: d for k, d in DOCS.items() if set(d) == {"config", "run"}}  # queue.yaml templates
CONFIGMAPS = {d["metadata"]["name"]: d for d in KUBE.values() if d["kind"] == "ConfigMap"}
ACCOUNTS = {d["metadata"]["name"]: d for d in KUBE.values() if d["kind"] == "ServiceAccount"}


def test_every_yaml_is_understood():
    assert YAML_FILES, "no YAML under cluster/"
    known = set(CRD_FILES) | {"ConfigMap", "ServiceAccount"}
    for key, doc in DOCS.items():
        if "kind" in doc:
            assert doc["kind"] in known, f"{key}: no schema for kind {doc['kind']}"
            assert doc.get("apiVersion") == ("ray.io/v1" if doc["kind"] in CRD_FILES else "v1")
        else:
            assert key in LAUNCHERS or key in QUEUES or "featureGates" in doc, (
                f"{key}: unrecognized YAML")
    assert {d["kind"] for d in KUBE.values()} >= {"RayCluster", "RayJob", "RayCronJob"}


def strict(schema):
    """The CRD schema with unknown fields refused (the API server prunes them silently)."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def crd_validator(kind: str):
    doc = json.loads((CRDS / CRD_FILES[kind]).read_text())
    assert doc["kind"] == kind and doc["version"] == "v1"
    return jsonschema.Draft202012Validator(strict(doc["openAPIV3Schema"]))


@pytest.mark.parametrize("key", sorted(RAY_KINDS))
def test_kuberay_resources_validate_against_the_crd(key):
    doc = RAY_KINDS[key]
    errors = sorted(crd_validator(doc["kind"]).iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)
    name = doc["metadata"]["name"]
    assert DNS1035.match(name) and len(name) <= MAX_NAME[doc["kind"]], name


def test_the_strict_schema_refuses_typos():
    """A guard on the guard: misspelt fields, in the RayJob and deep in a pod, are errors."""
    job = copy.deepcopy(next(d for d in RAY_KINDS.values() if d["kind"] == "RayJob"))
    job["spec"]["shutdownAfterJobFinish"] = True
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    head["containers"][0]["imagePullPolicyy"] = "Always"
    head["serviceAccountName"] = 7
    found = {e.message for e in crd_validator("RayJob").iter_errors(job)}
    assert any("shutdownAfterJobFinish'" in m for m in found), found
    assert any("imagePullPolicyy" in m for m in found), found
    assert any("7 is not of type 'string'" in m for m in found), found


def test_plain_kube_resources():
    for key, doc in KUBE.items():
        assert DNS1035.match(doc["metadata"]["name"]) or doc["kind"] == "ConfigMap", key
        if doc["kind"] == "ConfigMap":
            assert set(doc) <= {"apiVersion", "kind", "metadata", "data"}, key
            assert all(isinstance(v, str) for v in doc["data"].values()), key
        if doc["kind"] == "ServiceAccount":
            assert set(doc) <= {"apiVersion", "kind", "metadata"}, key
            role = doc["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
            assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@-]+", role), role


def test_launcher_configs_validate_against_rays_schema():
    schema = json.loads((pathlib.Path(ray.__file__).parent / "autoscaler" / "ray-schema.json")
                        .read_text())
    assert LAUNCHERS
    for key, cfg in LAUNCHERS.items():
        jsonschema.validate(cfg, schema)
        assert cfg["docker"]["image"] == IMAGE, key
        opts = " ".join(cfg["docker"].get("run_options", []))
        assert f"AWS_REGION={cfg['provider']['region']}" in opts, key
        for name, node in cfg["available_node_types"].items():
            profile = node["node_config"].get("IamInstanceProfile", {})
            assert profile.get("Arn") or profile.get("Name"), f"{key}: {name} has no profile"


# --- Ray clusters inside the resources ----------------------------------------------------

def cluster_specs() -> Iterator[tuple[str, dict, dict | None]]:
    """(where, RayClusterSpec, RayJobSpec or None) for every Ray cluster a resource makes."""
    for key, doc in RAY_KINDS.items():
        spec = doc["spec"]
        if doc["kind"] == "RayCluster":
            yield key, spec, None
        else:
            job = spec["jobTemplate"] if doc["kind"] == "RayCronJob" else spec
            yield key, job["rayClusterSpec"], job


def pod_templates(spec: dict) -> Iterator[tuple[str, dict]]:
    yield "head", spec["headGroupSpec"]["template"]["spec"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]["spec"]


def job_specs() -> Iterator[tuple[str, dict]]:
    for key, _, job in cluster_specs():
        if job is not None:
            yield key, job


def test_every_image_is_the_projects():
    seen = 0
    for key, spec, job in cluster_specs():
        assert spec["rayVersion"] == ray.__version__, key
        pods = list(pod_templates(spec))
        if job is not None:
            pods.append(("submitter", job["submitterPodTemplate"]["spec"]))
        for group, pod in pods:
            for c in pod.get("containers", []) + pod.get("initContainers", []):
                assert c["image"] == IMAGE, f"{key} {group}: {c['image']}"
                seen += 1
        if "image" in spec.get("autoscalerOptions", {}):
            assert spec["autoscalerOptions"]["image"] == IMAGE, key
    assert seen


def test_every_pod_has_the_s3_identity_and_region():
    regions = {cfg["provider"]["region"] for cfg in LAUNCHERS.values()}
    for key, spec, _ in cluster_specs():
        for group, pod in pod_templates(spec):
            account = pod.get("serviceAccountName")
            assert account in ACCOUNTS, f"{key} {group}: service account {account!r}"
            for c in pod["containers"]:
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                assert env.get("AWS_REGION") and env.get("AWS_DEFAULT_REGION"), f"{key} {group}"
                regions.add(env["AWS_REGION"])
    assert len(regions) == 1, f"more than one region: {regions}"


def test_long_lived_cluster_autoscales():
    clusters = [(k, s) for k, s, job in cluster_specs() if job is None]
    assert clusters
    for key, spec in clusters:
        assert spec.get("enableInTreeAutoscaling") is True, key
        for g in spec["workerGroupSpecs"]:
            assert 0 <= g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"], key
            assert g["maxReplicas"] > 0, key


def test_ray_start_params():
    for key, spec, _ in cluster_specs():
        groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
        for g in groups:
            params = g.get("rayStartParams", {})
            assert not ({"num-cpus", "num-gpus", "memory", "resources"} & set(params)
                        and g.get("resources")), f"{key}: resources set twice"
            for c in g["template"]["spec"]["containers"]:
                assert "command" not in c and "args" not in c, (
                    f"{key}: KubeRay writes the Ray containers' command itself")


def test_jobs_end_and_clean_up():
    jobs = dict(job_specs())
    assert jobs
    for key, job in jobs.items():
        assert job.get("shutdownAfterJobFinishes") is True, key
        assert job.get("ttlSecondsAfterFinished", -1) >= 0, key
        assert job.get("activeDeadlineSeconds", 0) > 0, key
        assert "clusterSelector" not in job, key
        assert job["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never", key


def test_configmaps_live_in_their_own_files():
    """Applying a job's file never creates its config, and applying a config file never
    starts a job: a file holds ConfigMaps only, or no ConfigMap at all."""
    for path in YAML_FILES:
        kinds = {d.get("kind") for d in yaml.safe_load_all(path.read_text()) if d}
        if "ConfigMap" in kinds:
            assert kinds == {"ConfigMap"}, f"{path.name} mixes a ConfigMap with {kinds}"
    for key, spec, _ in cluster_specs():
        for group, pod in pod_templates(spec):
            for v in pod.get("volumes", []):
                if "configMap" in v:
                    assert v["configMap"]["name"] in CONFIGMAPS, f"{key} {group}: {v}"


def test_jobs_write_to_a_predictable_run():
    """A RayJob's submission id is its ``spec.jobId`` = its name, and jobs/extract.py makes
    that the run id when the config names none (jobs/jobresult.py): the run of RayJob NAME is
    ``<store.uri>/NAME`` (docs/cluster.md, "Finding the result")."""
    for key, doc in RAY_KINDS.items():
        if doc["kind"] != "RayJob":
            continue
        assert doc["spec"].get("jobId") == doc["metadata"]["name"], key
        if "jobs/extract.py" in doc["spec"]["entrypoint"]:
            assert "store.run_id" not in doc["spec"]["entrypoint"], key
            _, args = entrypoint(doc["spec"])
            raw = yaml.safe_load(mounted_file(doc["spec"]["rayClusterSpec"], args[0]))
            assert not raw.get("store", {}).get("run_id"), f"{key}: a fixed store.run_id"
    for key, doc in RAY_KINDS.items():  # a jobId in a cron's template would repeat nightly
        if doc["kind"] == "RayCronJob":
            assert "jobId" not in doc["spec"]["jobTemplate"], key


def extract_job() -> dict:
    jobs = [d for d in RAY_KINDS.values() if d["kind"] == "RayJob"
            and "jobs/extract.py" in d["spec"]["entrypoint"]]
    assert len(jobs) == 1
    return jobs[0]


def scheduled_args(job: dict):
    """(tick arguments, --gc-keep, --result-file) of a jobs/scheduled_edit.py entrypoint."""
    import argparse

    from engram_ray.cli import build_parser

    script, args = entrypoint(job)
    assert script == "jobs/scheduled_edit.py", script
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--gc-keep", type=int)
    p.add_argument("--result-file")
    own, rest = p.parse_known_args(args)
    return build_parser().parse_args(["tick", *rest]), own.gc_keep, own.result_file


def check_queue_file() -> None:
    """cluster/queue.yaml as the tick reads it (``schedule.read_queue``, every key checked)."""
    import tempfile

    from engram_ray.schedule import QUEUE_YAML, read_queue

    (key,) = QUEUES
    with tempfile.TemporaryDirectory() as d:
        (pathlib.Path(d) / QUEUE_YAML).write_text((ROOT / key.split("#")[0]).read_text())
        spec = read_queue(d)
    assert (spec.config, spec.run) == (QUEUES[key]["config"], QUEUES[key]["run"])


def test_scheduled_path_is_a_tick_with_retention():
    """The RayCronJob runs ``engram-ray tick`` on a queue and then ``gc --keep N``; the
    queue's config is the one mounted on its head, its first run the one-off RayJob's."""
    crons = [d for d in RAY_KINDS.values() if d["kind"] == "RayCronJob"]
    assert crons
    gates = [d["featureGates"] for d in DOCS.values() if "featureGates" in d]
    assert gates and {"name": "RayCronJob", "enabled": True} in gates[0]
    extract = extract_job()
    raw = yaml.safe_load(mounted_file(extract["spec"]["rayClusterSpec"],
                                      entrypoint(extract["spec"])[1][0]))
    first_run = f"{raw['store']['uri']}/{extract['spec']['jobId']}"
    assert raw["store"].get("keep_statistics") is True, "the first run must keep its Σ"
    (queue,) = QUEUES.values()
    assert queue["run"] == first_run
    check_queue_file()
    for cron in crons:
        job = cron["spec"]["jobTemplate"]
        tick, keep, result_file = scheduled_args(job)
        assert tick.queue.startswith("s3://") and not tick.local, tick
        assert keep is not None and keep >= 1
        assert result_file and result_file.startswith("s3://"), "the result must outlive the pod"
        queue_cfg = yaml.safe_load(mounted_file(job["rayClusterSpec"], queue["config"]))
        assert queue_cfg == raw, "the tick extends with the first run's config"


# --- nothing installed at start -----------------------------------------------------------

def strings(node) -> Iterator[str]:
    if isinstance(node, dict):
        for v in node.values():
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)
    elif isinstance(node, str):
        yield node


def test_nothing_is_installed_at_start():
    for key, doc in DOCS.items():
        for s in strings(doc):
            assert not PIP_INSTALL.search(s), f"{key}: {s!r}"
    for script in CLUSTER.rglob("*.sh"):
        code = [ln for ln in script.read_text().splitlines() if not ln.lstrip().startswith("#")]
        assert not PIP_INSTALL.search("\n".join(code)), script
    for key, job in job_specs():
        env = yaml.safe_load(job.get("runtimeEnvYAML") or "{}") or {}
        assert isinstance(env, dict), key
        assert not RUNTIME_ENV_INSTALLS & set(env), f"{key}: runtime env installs {set(env)}"
        assert all(isinstance(v, str) for v in env.get("env_vars", {}).values()), key


# --- what the entrypoints and docs name ---------------------------------------------------

def named_texts() -> Iterator[tuple[str, str]]:
    for path in [*YAML_FILES, *CLUSTER.rglob("*.sh"), ROOT / "docs" / "cluster.md",
                 *(ROOT / "jobs").glob("*.py")]:
        if path.exists():
            yield str(path.relative_to(ROOT)), path.read_text()


def image_path_in_repo(path: str) -> pathlib.Path:
    rel = path[len(APP_DIR) + 1:]
    assert rel.split("/")[0] in {"engram_ray", "pipelines", "jobs"}, f"{path} is not in the image"
    return ROOT / rel


def test_every_named_path_exists():
    for where, text in named_texts():
        for path in re.findall(rf"{re.escape(APP_DIR)}/[\w./-]*\w", text):
            assert image_path_in_repo(path).exists(), f"{where}: {path}"
        for path in REPO_PATH.findall(text):
            assert (ROOT / path).exists(), f"{where}: {path}"
        for module in re.findall(r"python3? -m ([\w.]+)", text):
            assert importlib.util.find_spec(module) is not None, f"{where}: -m {module}"


def test_every_named_pipeline_is_registered():
    from pipelines import PIPELINES

    named = [(w, n) for w, text in named_texts() for n in re.findall(r"--pipeline[= ]([a-z]\w*)", text)]
    assert named
    for where, name in named:
        assert name in PIPELINES, f"{where}: pipeline {name!r}"


def mounted_file(spec: dict, path: str) -> str:
    """The text of ``path`` as the head sees it: a mounted ConfigMap key or the image's file."""
    if path.startswith(APP_DIR + "/"):
        return image_path_in_repo(path).read_text()
    head = spec["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in head.get("volumes", [])}
    for mount in head["containers"][0].get("volumeMounts", []):
        if path.startswith(mount["mountPath"].rstrip("/") + "/"):
            cm = CONFIGMAPS[volumes[mount["name"]]["configMap"]["name"]]
            return cm["data"][path[len(mount["mountPath"].rstrip("/")) + 1:]]
    raise AssertionError(f"{path} is neither in the image nor mounted on the head")


def load_apply_job():
    spec = importlib.util.spec_from_file_location("jobs_apply", ROOT / "jobs" / "apply.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def entrypoint(job: dict) -> tuple[str, list[str]]:
    argv = shlex.split(job["entrypoint"])
    assert argv[0] == "python" and argv[1].startswith(APP_DIR + "/jobs/"), argv
    return argv[1][len(APP_DIR) + 1:], argv[2:]


def test_entrypoint_arguments_and_inline_configs_are_valid():
    from engram_ray.cli import build_parser
    from engram_ray.config import ExtractConfig, apply_overrides

    parser, checked = build_parser(), set()
    for key, spec, job in cluster_specs():
        if job is None:
            continue
        script, args = entrypoint(job)
        if script == "jobs/extract.py":
            ns = parser.parse_args(["extract", *strip_result_file(args)])
            raw = yaml.safe_load(mounted_file(spec, ns.config))
            cfg = ExtractConfig.from_dict(apply_overrides(copy.deepcopy(raw), ns.set or []))
            check_capacity(key, spec, cfg.parallel)
            checked.add(ns.config)
        elif script == "jobs/scheduled_edit.py":
            (queue,) = QUEUES.values()
            raw = yaml.safe_load(mounted_file(spec, queue["config"]))
            check_capacity(key, spec, ExtractConfig.from_dict(raw).parallel)
            scheduled_args(job)
            checked.add(queue["config"])
        elif script == "jobs/apply.py" and args[:1] == ["--batch"]:
            ns = parser.parse_args(["batch", *args[1:]])
            reqs = read_requests_text(mounted_file(spec, ns.requests), ns.requests)
            assert reqs and all(r.concepts and r.out for r in reqs), key
            assert ns.summary and ns.summary.startswith("s3://"), \
                f"{key}: the summary must not go to the read-only ConfigMap mount"
            checked.add(ns.requests)
        else:
            parser.parse_args([pathlib.Path(script).stem, *args])
    for cm in CONFIGMAPS.values():  # no inline config that no job reads
        for name in cm["data"]:
            assert any(c.endswith("/" + name) for c in checked), f"unused {name}"


def strip_result_file(args: list[str]) -> list[str]:
    """jobs/extract.py's arguments less its own ``--result-file URI``."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--result-file":
            skip = True
        elif not a.startswith("--result-file="):
            out.append(a)
    return out


def test_inline_config_errors_are_caught():
    """The check above would catch a typo in an inline config (a guard on the guard)."""
    from engram_ray.config import ConfigError, ExtractConfig

    raw = yaml.safe_load(CONFIGMAPS["engram-ray-extract"]["data"]["extract.yaml"])
    raw["parallel"]["num_gpu"] = 1
    with pytest.raises(ConfigError, match="parallel.num_gpu"):
        ExtractConfig.from_dict(raw)
    text = CONFIGMAPS["engram-ray-apply"]["data"]["requests.jsonl"]
    with pytest.raises(ValueError, match="requests.jsonl, row 0: column 'concepts' is missing"):
        read_requests_text(text.replace('"concepts"', '"forget"', 1), "requests.jsonl")


def read_requests_text(text: str, name: str):
    """``engram-ray batch``'s own reader on an inline requests file (written to a temporary
    file of the same name, so errors name it)."""
    import tempfile

    from engram_ray.requests import read_requests

    with tempfile.TemporaryDirectory() as d:
        path = pathlib.Path(d) / pathlib.Path(name).name
        path.write_text(text)
        return read_requests(str(path))


def test_apply_job_is_the_cli():
    """``jobs/apply.py`` adds nothing of its own: ``--batch`` is ``engram-ray batch``."""
    job = load_apply_job()
    assert job.run(["--batch", "/nonexistent/requests.jsonl", "--local"]) == 2


def quantity(q) -> float:
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def check_capacity(key: str, spec: dict, p) -> None:
    """A RayJob's fixed-size cluster can hold its config (what Ray would otherwise wait on)."""
    head_cpus = spec["headGroupSpec"]["rayStartParams"].get("num-cpus")
    head_limits = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    nodes = [(quantity(head_cpus if head_cpus is not None else head_limits["cpu"]), 0.0)]
    for g in spec.get("workerGroupSpecs", []):
        assert g["minReplicas"] == g["replicas"] == g["maxReplicas"], f"{key}: fixed size"
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        nodes += [(quantity(limits["cpu"]), quantity(limits.get("nvidia.com/gpu", 0)))] * g[
            "replicas"]
    actors = p.stages * p.replicas
    assert any(c >= p.num_cpus and g >= p.num_gpus for c, g in nodes), f"{key}: no node fits"
    assert sum(g for _, g in nodes) >= actors * p.num_gpus, f"{key}: too few GPUs"
    stream = p.replicas * 0.25 + p.encode_num_cpus
    assert sum(c for c, _ in nodes) >= actors * p.num_cpus + stream, f"{key}: too few CPUs"
    assert max(c for c, _ in nodes) >= p.solver_num_cpus, f"{key}: no node fits a solver task"


# --- pods fit their nodes -----------------------------------------------------------------
# Allocatable = capacity − kube-reserved − system-reserved − hard eviction threshold (kubelet).
# EKS AMIs (AL2 bootstrap.sh, AL2023 nodeadm) set kube-reserved from the instance type and
# leave system-reserved unset:
#   cpu:    6% of the first core, 1% of the second, 0.5% of cores 3–4, 0.25% of each above 4
#   memory: 11 MiB × max pods + 255 MiB;  eviction: memory.available < 100Mi
#   ephemeral-storage: 1Gi;  eviction: nodefs.available < 10%
# max pods: the AMI's eni-max-pods.txt, ENIs × (IPv4 addresses per ENI − 1) + 2.
# EC2 facts per instance type: vCPUs, memory (MiB), GPUs, max pods.
INSTANCE_TYPES = {
    "m6i.2xlarge": (8, 32768, 0, 58),
    "r6i.2xlarge": (8, 65536, 0, 58),
    "g6e.2xlarge": (8, 65536, 1, 58),
}
# Our margins, not AWS figures: kubelet's memory capacity is the kernel's MemTotal, a few
# percent under the nominal size (firmware and kernel reservations): 6% budgeted. DaemonSets
# (aws-node, kube-proxy, the NVIDIA device plugin, CSI node drivers) keep 0.5 CPU and 1 GiB.
# Node disks: node groups with 100 GiB root volumes, 30 GiB of them for the OS and the image.
MEMTOTAL_LOSS = 0.06
DAEMONSETS = {"cpu": 0.5, "memory": 1024 * 2**20}
NODE_DISK, IMAGE_AND_OS = 100 * 2**30, 30 * 2**30
# KubeRay 1.7.0's autoscaler sidecar in an autoscaling head (no autoscalerOptions.resources).
AUTOSCALER_SIDECAR = {"cpu": 0.5, "memory": 512 * 2**20}
MIB = 2**20


def reserved_millicores(vcpus: int) -> float:
    """EKS AMI kube-reserved CPU (millicores) for ``vcpus`` cores."""
    rates = [60.0, 10.0, 5.0, 5.0] + [2.5] * max(0, vcpus - 4)
    return sum(rates[:vcpus])


def allocatable(instance_type: str) -> dict[str, float]:
    """What pods of ours may request on one node: cores, bytes, GPUs (see above)."""
    vcpus, mem_mib, gpus, max_pods = INSTANCE_TYPES[instance_type]
    cpu = vcpus - reserved_millicores(vcpus) / 1000 - DAEMONSETS["cpu"]
    mem = (mem_mib * (1 - MEMTOTAL_LOSS) - (11 * max_pods + 255) - 100) * MIB \
        - DAEMONSETS["memory"]
    disk = NODE_DISK - 2**30 - 0.10 * NODE_DISK - IMAGE_AND_OS
    return {"cpu": cpu, "memory": mem, "nvidia.com/gpu": gpus, "ephemeral-storage": disk}


def to_number(q) -> float:
    """A Kubernetes quantity (``500m``, ``56Gi``, ``16G``, ``7``) as a number."""
    m = re.fullmatch(r"([0-9.]+)(m|Ki|Mi|Gi|Ti|k|M|G|T)?", str(q))
    assert m, q
    scale = {None: 1, "m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
             "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[m.group(2)]
    return float(m.group(1)) * scale


def pod_requests(pod: dict, extra: dict | None = None) -> dict[str, float]:
    """A pod's requests: its containers' sum (and the largest init container, if larger)."""
    total: dict[str, float] = dict(extra or {})
    for c in pod["containers"]:
        for k, v in c.get("resources", {}).get("requests", {}).items():
            total[k] = total.get(k, 0) + to_number(v)
    for c in pod.get("initContainers", []):
        for k, v in c.get("resources", {}).get("requests", {}).items():
            total[k] = max(total.get(k, 0), to_number(v))
    return total


def every_pod() -> Iterator[tuple[str, dict, dict]]:
    """(where, pod spec, extra requests KubeRay adds) for every pod a manifest makes."""
    for key, spec, job in cluster_specs():
        for group, pod in pod_templates(spec):
            extra = AUTOSCALER_SIDECAR if (group == "head"
                                           and spec.get("enableInTreeAutoscaling")) else {}
            yield f"{key} {group}", pod, extra
        if job is not None:
            yield f"{key} submitter", job["submitterPodTemplate"]["spec"], {}


def test_allocatable_arithmetic():
    """The formulas above on the numbers docs/cluster.md writes down."""
    assert reserved_millicores(8) == 90  # 60 + 10 + 2 × 5 + 4 × 2.5
    assert reserved_millicores(1) == 60
    g6e = allocatable("g6e.2xlarge")
    assert g6e["cpu"] == pytest.approx(7.41)
    # 65536 × 0.94 − (11 × 58 + 255) − 100 − 1024 = 61603.84 − 893 − 100 − 1024 MiB
    assert g6e["memory"] / MIB == pytest.approx(59586.84)
    assert allocatable("m6i.2xlarge")["memory"] / MIB == pytest.approx(28784.92)
    assert allocatable("r6i.2xlarge")["ephemeral-storage"] / 2**30 == pytest.approx(59.0)
    text = (ROOT / "docs" / "cluster.md").read_text()
    for name in INSTANCE_TYPES:
        a = allocatable(name)
        row = f"| {name} | {a['cpu']:.2f} | {a['memory'] / 2**30:.1f} GiB |"
        assert row in text, f"docs/cluster.md has no row {row!r}"


def test_every_pod_fits_the_instance_type_it_names():
    seen = set()
    for where, pod, extra in every_pod():
        itype = (pod.get("nodeSelector") or {}).get("node.kubernetes.io/instance-type")
        assert itype in INSTANCE_TYPES, f"{where}: names no known instance type ({itype})"
        seen.add(itype)
        need, have = pod_requests(pod, extra), allocatable(itype)
        for res, amount in need.items():
            assert res in have, f"{where}: requests {res}, which {itype} does not have"
            assert amount <= have[res], (
                f"{where}: requests {amount:g} {res}, {itype} has {have[res]:g} allocatable")
        if have["nvidia.com/gpu"]:
            assert need.get("nvidia.com/gpu", 0) > 0, f"{where}: a GPU node for a CPU pod"
    assert seen <= set(INSTANCE_TYPES)
    for cfg in LAUNCHERS.values():  # the launcher names the same types
        for node in cfg["available_node_types"].values():
            assert node["node_config"]["InstanceType"] in INSTANCE_TYPES


def test_the_fit_check_catches_an_oversized_pod():
    """A guard on the guard: the manifests' old GPU workers (8 CPUs, 64Gi on a g6e.2xlarge)
    do not fit."""
    have = allocatable("g6e.2xlarge")
    old = pod_requests({"containers": [{"resources": {"requests": {
        "cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "1"}}}]})
    assert old["cpu"] > have["cpu"] and old["memory"] > have["memory"]


# Llama-3.2-1B, the model the apply RayJob's runs name: 1,235,814,400 parameters in bf16.
MODEL_BYTES = 1_235_814_400 * 2
RAY_SCRATCH = 2 * 2**30


def test_apply_head_ephemeral_storage_is_sized_from_the_model():
    """Edits to s3:// are written whole to local disk first: per run, its full and adapter
    requests at once plus the cached base model, for every run the head writes at once."""
    jobs = [d for d in RAY_KINDS.values() if d["kind"] == "RayJob"
            and "jobs/apply.py" in d["spec"]["entrypoint"]]
    assert jobs
    for job in jobs:
        spec = job["spec"]["rayClusterSpec"]
        _, args = entrypoint(job["spec"])
        reqs = read_requests_text(mounted_file(spec, args[1]), args[1])
        per_run: dict[str, int] = {}
        for r in reqs:
            per_run[r.run] = per_run.get(r.run, 0) + 1
        need = sum(n + 1 for n in per_run.values()) * MODEL_BYTES + RAY_SCRATCH
        assert need / 2**30 == pytest.approx(13.51, abs=0.01)  # the manifest's comment
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
        assert to_number(head["requests"]["ephemeral-storage"]) >= need
        assert head["limits"]["ephemeral-storage"] == head["requests"]["ephemeral-storage"]


# --- the launcher can pull its image ------------------------------------------------------

def test_launcher_logs_in_to_its_registry():
    """A private registry (ECR) needs a login on every node before Ray pulls the image, and
    the instance profiles need ECR read access (docs/cluster.md says which policy)."""
    for key, cfg in LAUNCHERS.items():
        host = cfg["docker"]["image"].split("/", 1)[0]
        assert "." in host or ":" in host, f"{key}: the image names no registry"
        region = cfg["provider"]["region"]
        login = (f"aws ecr get-login-password --region {region} | docker login --username AWS "
                 f"--password-stdin {host}")
        assert login in cfg.get("initialization_commands", []), f"{key}: no `{login}`"
        for node in cfg["available_node_types"].values():
            assert node["node_config"]["IamInstanceProfile"]["Arn"]
    assert "AmazonEC2ContainerRegistryReadOnly" in (ROOT / "docs" / "cluster.md").read_text()
