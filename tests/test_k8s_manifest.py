"""``paddlerun k8s render``: schema-valid manifests with the fields a restartable job needs, and
``paddlerun run``'s placement from a pod's environment (cluster/k8s_env.py)."""
import argparse
import inspect
import math

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from helpers import CONFIG
from k8s_pod import expand, objects

from paddlerun.cluster import k8s_env
from paddlerun.cluster.k8s_manifest import GPU_RESOURCE, SHARED_DIR
from paddlerun.launcher import cli
from paddlerun.launcher.exit_codes import BAD_CONFIG, REQUEUE
from paddlerun.launcher.process_tree import ProcessTree
from paddlerun.launcher.supervisor import TEARDOWN_TERM_S
from paddlerun.trainer.rundir.config import ConfigError, load_config

#: Option combinations, each rendered and validated.
CASES = {
    "one node, no volume": ["--nodes", "1"],
    "two nodes on a claim": ["--nodes", "2", "--pvc", "ckpt"],
    "GPUs, namespace, name, port, budget": [
        "--nodes", "4", "--pvc", "ckpt", "--gpus-per-node", "8", "--namespace", "ml",
        "--name", "lenet-big", "--master-port", "23456", "--backoff-limit", "2"],
    "config overrides": ["--nodes", "3", "--pvc", "ckpt", "--set", "supervisor.preempt_grace_s=200.5",
                         "--set", "train.max_steps=40", "--set", "launch.nproc_per_node=2"],
}
#: The oldest release with podFailurePolicy stable, and the newest the package ships.
VERSIONS = ["1.31.0", latest_version()]


def render(tmp_path, *args):
    out = tmp_path / "job.yaml"
    code = cli.main(["k8s", "render", CONFIG, "--image", "registry.example/paddlerun:1", *args,
                     "-o", str(out)])
    assert code == 0
    return objects(out.read_text())


def pod_spec(manifest):
    return manifest["Job"]["spec"]["template"]["spec"]


@pytest.mark.parametrize("case", CASES)
def test_every_rendered_object_validates_against_the_kubernetes_schemas(tmp_path, case):
    manifest = render(tmp_path, *CASES[case])
    assert sorted(manifest) == ["ConfigMap", "Job", "Service"]
    for obj in manifest.values():
        for version in VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


def test_the_schemas_catch_a_misspelt_or_mistyped_field(tmp_path):
    """The validation above can fail: strict schemas refuse unknown and mistyped fields."""
    manifest = render(tmp_path, "--nodes", "2", "--pvc", "ckpt")
    pod_spec(manifest)["subdomian"] = pod_spec(manifest).pop("subdomain")
    with pytest.raises(kubernetes_validate.ValidationError, match="subdomian"):
        kubernetes_validate.validate(manifest["Job"], latest_version(), strict=True)
    manifest["Job"]["spec"]["completions"] = "2"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(manifest["Job"], latest_version(), strict=True)


def test_an_indexed_job_of_n_pods_named_through_a_headless_service(tmp_path):
    manifest = render(tmp_path, "--nodes", "3", "--pvc", "ckpt", "--set", "job.name=My_Job")
    service, job = manifest["Service"], manifest["Job"]
    assert service["metadata"]["name"] == job["metadata"]["name"] == "my-job"
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    template = job["spec"]["template"]
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 3, 3)
    assert spec["podReplacementPolicy"] == "Failed"
    assert spec["backoffLimit"] == 6
    assert template["spec"]["subdomain"] == "my-job"
    assert template["spec"]["restartPolicy"] == "Never"
    # Pod 0's hostname (<job>-<index>) under the Service's subdomain is the master.
    env = {e["name"]: e["value"] for e in template["spec"]["containers"][0]["env"]}
    assert env == {k8s_env.NNODES: "3", k8s_env.MASTER: "my-job-0.my-job:29500", "PYTHONUNBUFFERED": "1"}


def policy_action(rules, exit_code, conditions=()):
    """What the Job controller does with a failed pod: the first matching rule, else Count."""
    for rule in rules:
        if "onExitCodes" in rule:
            codes = rule["onExitCodes"]
            assert codes["operator"] == "In" and codes["containerName"] == "trainer"
            if exit_code in codes["values"]:
                return rule["action"]
        elif any(p["type"] == c and p["status"] == "True" for p in rule["onPodConditions"]
                 for c in conditions):
            return rule["action"]
    return "Count"


def test_preemptions_and_evictions_do_not_count_other_failures_do_a_bad_config_ends_the_job(tmp_path):
    rules = render(tmp_path, "--nodes", "2", "--pvc", "c")["Job"]["spec"]["podFailurePolicy"]["rules"]
    assert policy_action(rules, REQUEUE) == "Ignore"             # snapshot taken, exit 75
    assert policy_action(rules, 137, ["DisruptionTarget"]) == "Ignore"  # evicted, SIGKILLed after the grace
    assert policy_action(rules, 1, ["DisruptionTarget"]) == "Ignore"
    assert policy_action(rules, 1) == "Count"                    # gave up after its own restarts
    assert policy_action(rules, 137) == "Count"                  # OOM-killed
    assert policy_action(rules, BAD_CONFIG) == "FailJob"         # never retried


def test_the_grace_period_covers_the_snapshot_grace_and_the_teardown(tmp_path):
    for grace_s in (60, 200.5, 1):
        spec = pod_spec(render(tmp_path, "--nodes", "1",
                               "--set", f"supervisor.preempt_grace_s={grace_s}"))
        # After its grace the supervisor tears down: SIGTERM, TEARDOWN_TERM_S, SIGKILL, a wait.
        kill_wait = inspect.signature(ProcessTree.close).parameters["kill_timeout_s"].default
        teardown = TEARDOWN_TERM_S + kill_wait
        assert spec["terminationGracePeriodSeconds"] >= math.ceil(grace_s) + teardown + 10


def test_checkpoints_on_the_claim_every_pod_mounts_and_a_run_dir_per_pod(tmp_path):
    manifest = render(tmp_path, "--nodes", "2", "--pvc", "team-rwx", "--name", "j")
    spec = pod_spec(manifest)
    volumes = {v["name"]: v for v in spec["volumes"]}
    (container,) = spec["containers"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts[SHARED_DIR]]["persistentVolumeClaim"] == {"claimName": "team-rwx"}
    assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory"}
    config_dir = [p for p, name in mounts.items() if "configMap" in volumes[name]][0]
    assert volumes[mounts[config_dir]]["configMap"]["name"] == manifest["ConfigMap"]["metadata"]["name"]
    # The pod runs the ConfigMap's config; the kubelet expands the index into the run dir.
    command = container["command"]
    assert command[:3] == ["paddlerun", "run", f"{config_dir}/config.yaml"]
    run_dirs = {expand(command[command.index("--run-dir") + 1], {"JOB_COMPLETION_INDEX": str(i)})
                for i in range(2)}
    assert run_dirs == {f"{SHARED_DIR}/j/pod-0", f"{SHARED_DIR}/j/pod-1"}
    pod_config = yaml.safe_load(manifest["ConfigMap"]["data"]["config.yaml"])
    assert pod_config["checkpoint"]["dir"] == f"{SHARED_DIR}/j/checkpoints"


def test_the_configmap_holds_the_users_config_with_overrides(tmp_path):
    manifest = render(tmp_path, "--nodes", "2", "--pvc", "c", "--set", "train.lr=0.01")
    path = tmp_path / "pod.yaml"
    path.write_text(manifest["ConfigMap"]["data"]["config.yaml"])
    pod, user = load_config(path).to_dict(), load_config(CONFIG, ["train.lr=0.01"]).to_dict()
    assert pod["train"] == user["train"] and pod["supervisor"] == user["supervisor"]
    # Placement is left to each pod's environment.
    assert (pod["launch"]["nnodes"], pod["launch"]["node_rank"], pod["launch"]["master"]) == (1, 0, None)


def test_gpus_are_requested_only_when_asked(tmp_path):
    assert "resources" not in pod_spec(render(tmp_path, "--nodes", "1"))["containers"][0]
    manifest = render(tmp_path, "--nodes", "2", "--pvc", "c", "--gpus-per-node", "4")
    container = pod_spec(manifest)["containers"][0]
    assert container["resources"] == {"limits": {GPU_RESOURCE: 4}}


@pytest.mark.parametrize("args, message", [
    (["--nodes", "2"], "--nodes 2 needs --pvc CLAIM"),
    (["--nodes", "0"], "--nodes 0: must be >= 1"),
    (["--nodes", "1", "--name", "Bad_Name"], "--name 'Bad_Name'"),
    (["--nodes", "1", "--name", "x" * 62], "at most 63 characters"),
    (["--nodes", "1", "--gpus-per-node", "2", "--set", "launch.nproc_per_node=4"], "one worker per GPU"),
    (["--nodes", "1", "--set", "launch.device=gpu"], "--gpus-per-node"),
    (["--nodes", "1", "--set", "supervisor.preempt_signals=[SIGUSR1]"], "lacks SIGTERM"),
    (["--nodes", "1", "--set", "train.epoch=3"], "did you mean 'train.epochs'"),
])
def test_options_that_cannot_work_exit_2_naming_the_fix(tmp_path, capsys, args, message):
    out = tmp_path / "job.yaml"
    code = cli.main(["k8s", "render", CONFIG, "--image", "i", *args, "-o", str(out)])
    assert code == BAD_CONFIG
    assert message in capsys.readouterr().err
    assert not out.exists()


# ---------------------------------------------------------------- k8s_env

def test_outside_kubernetes_nothing_changes():
    assert k8s_env.launch_overrides({"JOB_COMPLETION_INDEX": "1", "HOME": "/root"}) == []


def test_a_pods_place_comes_from_its_environment():
    env = {k8s_env.NNODES: "3", k8s_env.MASTER: "j-0.j:29500"}
    assert k8s_env.launch_overrides({**env, "JOB_COMPLETION_INDEX": "2"}) == [
        "launch.nnodes=3", "launch.node_rank=2", "launch.master=j-0.j:29500"]
    # Pod 0 serves the rendezvous: Paddle's launcher does so only for 127.0.0.1 or its own IP.
    pod0 = k8s_env.launch_overrides({**env, "JOB_COMPLETION_INDEX": "0"})
    assert pod0[-1] == "launch.master=127.0.0.1:29500"
    assert k8s_env.launch_overrides({k8s_env.NNODES: "1", "JOB_COMPLETION_INDEX": "0"}) == [
        "launch.nnodes=1", "launch.node_rank=0"]


@pytest.mark.parametrize("env, message", [
    ({k8s_env.NNODES: "2", k8s_env.MASTER: "j-0.j:1"}, "JOB_COMPLETION_INDEX is not"),
    ({k8s_env.NNODES: "2", k8s_env.MASTER: "j-0.j:1", "JOB_COMPLETION_INDEX": "2"}, "completions must"),
    ({k8s_env.NNODES: "two", "JOB_COMPLETION_INDEX": "0"}, "PADDLERUN_K8S_NNODES='two'"),
    ({k8s_env.NNODES: "2", "JOB_COMPLETION_INDEX": "1"}, "PADDLERUN_K8S_MASTER=''"),
    ({k8s_env.NNODES: "2", k8s_env.MASTER: "j-0.j", "JOB_COMPLETION_INDEX": "1"}, "expected HOST:PORT"),
])
def test_a_half_set_environment_is_a_config_error_naming_the_variable(env, message):
    with pytest.raises(ConfigError, match=message):
        k8s_env.launch_overrides(env)


def run_args(*argv):
    args = cli.build_parser().parse_args(["run", CONFIG, *argv])
    assert isinstance(args, argparse.Namespace)
    return args


def test_paddlerun_run_in_a_pod_is_placed_by_the_environment_and_an_explicit_set_still_wins(monkeypatch):
    monkeypatch.setenv(k8s_env.NNODES, "2")
    monkeypatch.setenv(k8s_env.MASTER, "j-0.j:29500")
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    launch = cli.resolve_run_config(run_args()).launch
    assert (launch.nnodes, launch.node_rank, launch.master) == (2, 1, "j-0.j:29500")
    launch = cli.resolve_run_config(run_args("--set", "launch.master=10.0.0.5:1234")).launch
    assert launch.master == "10.0.0.5:1234"


def test_paddlerun_run_with_a_broken_pod_environment_exits_2_before_starting_anything(
        monkeypatch, capsys, tmp_path):
    monkeypatch.setenv(k8s_env.NNODES, "2")
    monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    assert cli.main(["run", CONFIG, "--run-dir", str(tmp_path / "run")]) == BAD_CONFIG
    assert "JOB_COMPLETION_INDEX" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
