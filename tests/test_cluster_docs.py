"""docs/cluster.md is a walk-through a user can follow literally: every command in it (each
line of its ```sh blocks) is checked here, in order, against what it acts on.

- ``engram-ray …`` is parsed by the CLI's parser; ``ray …`` / ``.venv/bin/ray …`` by Ray's own
  click commands; the entrypoint after ``--`` by the CLI (its config loaded and validated with
  its ``--set`` overrides when it is a path in the image).
- ``kubectl apply -f F`` needs F to exist; the walk-through keeps the set of applied resources,
  and a Ray resource must find its service account and ConfigMaps applied by then (the
  ConfigMap step comes first). ``kubectl get/logs/port-forward`` name applied resources.
- ``make``, ``helm``, ``docker``, ``aws``, ``sed`` name targets, versions, files, registries
  and S3 locations the manifests use (the queue, its result file).
- A command of any other program fails the test, as does a command-looking line outside a
  ```sh block: nothing in the document goes unchecked.

What needs AWS or a Kubernetes API cannot run here; the local commands run for real in
tests/test_job_submit.py, and the result-finding steps in tests/test_job_result.py.
"""

from __future__ import annotations

import pathlib
import re
import shlex

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "cluster.md"
APP_DIR = "/home/ray/engram-ray"
PROGRAMS = ("kubectl", "helm", "aws", "docker", "make", "sed", "ray", ".venv/bin/ray",
            "engram-ray", "export", "python")


def sh_commands(text: str) -> list[str]:
    """Every command of the ```sh blocks, in order (a trailing backslash joins lines)."""
    out = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for cmd in block.replace("\\\n", " ").splitlines():
            if cmd.strip() and not cmd.lstrip().startswith("#"):
                out.append(cmd.strip())
    return out


def test_every_command_is_in_a_checked_block():
    outside = re.sub(r"```.*?```", "", DOC.read_text(), flags=re.S)
    for line in outside.splitlines():
        if line.startswith("    "):
            first = line.split()[0]
            assert first not in PROGRAMS, f"a command outside a ```sh block: {line.strip()}"
    assert len(sh_commands(DOC.read_text())) > 30


def manifests() -> dict[str, list[dict]]:
    return {str(p.relative_to(ROOT)): [d for d in yaml.safe_load_all(p.read_text()) if d]
            for p in (ROOT / "cluster").glob("*.yaml")}


def makefile_image() -> str:
    m = re.search(r"^IMAGE\s*\?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M)
    return m.group(1)


class Walk:
    """The state the walk-through builds: applied resources, the image, the queue."""

    def __init__(self) -> None:
        self.files = manifests()
        self.applied: dict[tuple[str, str], dict] = {}
        self.image: str | None = None
        docs = [d for ds in self.files.values() for d in ds]
        cron = next(d for d in docs if d.get("kind") == "RayCronJob")
        self.cron_args = shlex.split(cron["spec"]["jobTemplate"]["entrypoint"])
        self.queue = self.cron_args[2]
        self.tick_result = self.cron_args[self.cron_args.index("--result-file") + 1]
        self.region = next(d for d in docs if "provider" in d)["provider"]["region"]

    # --- kubectl -------------------------------------------------------------------------

    def kubectl(self, argv: list[str]) -> None:
        verb = argv[1]
        if verb == "apply":
            files = [argv[i + 1] for i, a in enumerate(argv) if a == "-f"]
            assert files and len(files) * 2 == len(argv) - 2, argv
            new = {}
            for f in files:
                assert f in self.files, f"kubectl apply: {f} is not a manifest"
                for d in self.files[f]:
                    new[(d["kind"], d["metadata"]["name"])] = d
            self.applied.update(new)
            for (kind, name), d in new.items():
                if kind in ("RayJob", "RayCluster", "RayCronJob"):
                    self.check_dependencies(kind, name, d)
        elif verb == "get":
            kind, name = argv[2], argv[3]
            want = {"rayjob": "RayJob", "raycronjob": "RayCronJob", "secret": "RayCluster"}[kind]
            assert (want, name) in self.applied, f"kubectl get {kind} {name}: never applied"
            rest = argv[4:]
            if kind == "secret":
                assert self.applied[(want, name)]["spec"]["authOptions"]["mode"] == "token"
                assert rest == ["-o", "jsonpath={.data.auth_token}"], rest
            elif rest:
                assert rest in (["-w"], ["-o", "jsonpath={.status.jobId}"]), rest
        elif verb == "logs":
            kind, _, name = argv[2].partition("/")
            assert kind == "job" and ("RayJob", name) in self.applied, argv
        elif verb == "port-forward":
            svc = argv[2]
            assert svc.startswith("svc/") and svc.endswith("-head-svc"), svc
            assert ("RayCluster", svc[4:-len("-head-svc")]) in self.applied, svc
            assert argv[3] == "8265:8265"
        else:
            raise AssertionError(f"kubectl {verb}: not a step this test knows")

    def check_dependencies(self, kind: str, name: str, doc: dict) -> None:
        spec = doc["spec"]
        if kind == "RayCronJob":
            spec = spec["jobTemplate"]
        cluster = spec if kind == "RayCluster" else spec["rayClusterSpec"]
        pods = [cluster["headGroupSpec"]["template"]["spec"],
                *(g["template"]["spec"] for g in cluster.get("workerGroupSpecs", []))]
        for pod in pods:
            account = pod.get("serviceAccountName")
            assert ("ServiceAccount", account) in self.applied, (
                f"{kind} {name} applied before its service account {account}")
            for v in pod.get("volumes", []):
                if "configMap" in v:
                    cm = v["configMap"]["name"]
                    assert ("ConfigMap", cm) in self.applied, (
                        f"{kind} {name} applied before its ConfigMap {cm}")

    # --- image, operator -----------------------------------------------------------------

    def make(self, argv: list[str]) -> None:
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M)
        target = argv[1]
        assert target in targets, f"make {target}: no such target"
        if target == "image":
            (arg,) = argv[2:]
            assert arg.startswith("IMAGE=")
            self.image = arg[len("IMAGE="):]
            assert self.image.endswith(":" + makefile_image().split(":")[-1]), self.image
            assert self.image.split("/", 1)[1].split(":")[0] == "engram-ray"

    def docker(self, argv: list[str]) -> None:
        assert self.image, "docker before make image"
        host = self.image.split("/", 1)[0]
        if argv[1] == "login":
            assert argv[2:] == ["--username", "AWS", "--password-stdin", host], argv
        elif argv[1] == "push":
            assert argv[2:] == [self.image], argv
        else:
            raise AssertionError(argv)

    def sed(self, argv: list[str]) -> None:
        assert argv[1] == "-i" and argv[3] == "cluster/*.yaml", argv
        _, old, new, _ = argv[2].split("#")
        assert old == makefile_image().split("/", 1)[0] and new == self.image.split("/", 1)[0]
        named = [f for f in self.files if "image:" in (ROOT / f).read_text()]
        assert named and all(old in (ROOT / f).read_text() for f in named)

    def helm(self, argv: list[str]) -> None:
        if argv[1:3] == ["repo", "add"]:
            assert argv[3] == "kuberay" and argv[4].startswith("https://ray-project.github.io/")
            return
        assert argv[1] == "install" and argv[3] == "kuberay/kuberay-operator", argv
        version = argv[argv.index("--version") + 1]
        assert (ROOT / "tests" / "data" / f"kuberay-v{version}").is_dir(), version
        assert (ROOT / argv[argv.index("-f") + 1]).is_file()

    def aws(self, argv: list[str]) -> None:
        if argv[1:3] == ["ecr", "create-repository"]:
            assert argv[3:] == ["--repository-name", "engram-ray"], argv
        elif argv[1:3] == ["ecr", "get-login-password"]:
            assert argv[3:] == ["--region", self.region], argv
        elif argv[1:3] == ["s3", "cp"]:
            src, dst = argv[3:5]
            if src.startswith("cluster/"):  # the queue spec, uploaded where the cron looks
                assert (ROOT / src).is_file() and dst == f"{self.queue}/queue.yaml", argv
            elif dst.startswith("s3://"):  # a user's shard or request file into the queue
                assert re.fullmatch(rf"{re.escape(self.queue)}/(shards|requests)/[\w.-]+", dst)
                assert dst.rsplit("/", 1)[1] == src, argv
            else:  # reading back what a tick wrote
                assert src == self.tick_result or src.startswith(f"{self.queue}/results/"), src
        else:
            raise AssertionError(argv)

    # --- engram-ray and ray --------------------------------------------------------------

    def engram_ray(self, argv: list[str]) -> None:
        from engram_ray.cli import build_parser

        build_parser().parse_args(argv[1:])

    def ray(self, argv: list[str]) -> None:
        from ray.dashboard.modules.job.cli import job_cli_group
        from ray.scripts.scripts import cli

        if argv[1] == "job":
            cmd = job_cli_group.commands[argv[2]]
            args = argv[3:]
            cmd.make_context(argv[2], list(args))
            if "--" in args:
                args, entry = args[:args.index("--")], args[args.index("--") + 1:]
                self.entrypoint(entry)
            if argv[2] == "submit":
                assert "--submission-id" in args, "the run id is the submission id"
        else:
            cmd = cli.commands[argv[1]]
            cmd.make_context(argv[1], list(argv[2:]))
            if argv[1] in ("up", "dashboard", "down"):
                assert argv[2] in self.files and "provider" in self.files[argv[2]][0]

    def entrypoint(self, entry: list[str]) -> None:
        from engram_ray.cli import build_parser
        from engram_ray.config import load_config

        assert entry[0].endswith("python"), entry
        script = entry[1]
        assert script.endswith("/jobs/extract.py"), script
        ns = build_parser().parse_args(["extract", *entry[2:]])
        assert not any(s.startswith("store.run_id=") for s in ns.set or [])
        if ns.config.startswith(APP_DIR + "/"):
            assert script == f"{APP_DIR}/jobs/extract.py"
            load_config(str(ROOT / ns.config[len(APP_DIR) + 1:]), ns.set or [])

    def run(self, cmd: str) -> None:
        for inner in re.findall(r"\$\((.*?)\)", cmd):
            self.run(inner)
        cmd = re.sub(r"\$\((.*?)\)", "SUBST", cmd).rstrip("&").strip()
        stages = [shlex.split(s) for s in _split_pipes(cmd)]
        first, *rest = stages
        for tail in rest:  # only filters after a pipe
            assert tail[0] in ("grep", "base64", "docker"), cmd
            if tail[0] == "grep":
                assert tail[1:] == ['^{"run"'], tail  # the jobs' JSON line (jobresult.py)
            if tail[0] == "docker":
                self.docker(tail)
        prog = first[0]
        if prog == "export":
            assert re.fullmatch(r"[A-Z_]+=SUBST", first[1]), first
            return
        handler = {"kubectl": self.kubectl, "make": self.make, "docker": self.docker,
                   "sed": self.sed, "helm": self.helm, "aws": self.aws,
                   "engram-ray": self.engram_ray, "ray": self.ray,
                   ".venv/bin/ray": self.ray}.get(prog)
        assert handler is not None, f"{prog}: a command this test does not check: {cmd}"
        handler(first)


def _split_pipes(cmd: str) -> list[str]:
    """``cmd`` split at unquoted ``|``."""
    out, cur, quote = [], "", None
    for ch in cmd:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "|":
            out.append(cur)
            cur = ""
            continue
        cur += ch
    return [*out, cur]


def test_the_walk_through_follows_through():
    walk = Walk()
    for cmd in sh_commands(DOC.read_text()):
        try:
            walk.run(cmd)
        except (AssertionError, SystemExit, Exception) as e:  # noqa: BLE001 - name the line
            pytest.fail(f"docs/cluster.md: `{cmd}`: {type(e).__name__}: {e}")
    kinds = {k for k, _ in walk.applied}
    assert {"RayJob", "RayCronJob", "RayCluster", "ConfigMap", "ServiceAccount"} <= kinds


def test_the_check_catches_a_job_applied_before_its_config():
    """A guard on the guard: the old order (RayJob file first) fails."""
    walk = Walk()
    walk.run("kubectl apply -f cluster/kuberay-serviceaccount.yaml")
    with pytest.raises(AssertionError, match="before its ConfigMap"):
        walk.run("kubectl apply -f cluster/kuberay-rayjob-extract.yaml")
    with pytest.raises(AssertionError, match="never applied"):
        walk.run("kubectl get rayjob engram-apply -w")
    with pytest.raises(AssertionError, match="does not check"):
        walk.run("curl http://example.com")
