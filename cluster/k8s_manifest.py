"""Kubernetes objects for an N-node paddlerun job: a ConfigMap, a headless Service, an Indexed Job.

Built as plain dicts (dumped by ``to_yaml``), one function per object, with the reason for
every field that is not boilerplate next to it. docs/kubernetes.md explains them for users.

- **ConfigMap** ``<job>-config``: the resolved config (the user's file plus ``--set``), so a
  change of hyperparameters needs no new image. Its checkpoint directory is on the shared
  volume; its ``launch`` placement is left at one node: every pod gets its own from the
  environment (cluster/k8s_env.py).
- **Service** ``<job>``: headless (``clusterIP: None``), so the cluster DNS publishes one
  name per pod, ``<job>-<index>.<job>``; the pods name pod 0 as the rendezvous master.
- **Job** ``<job>``: ``completionMode: Indexed`` gives pod *i* the index *i* (its node rank,
  in ``JOB_COMPLETION_INDEX``) and the hostname ``<job>-<i>``; ``subdomain`` puts that
  hostname under the Service. A pod that fails is replaced by one with the same index.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, List, Optional

import yaml

from paddlerun.cluster import k8s_env
from paddlerun.launcher.exit_codes import BAD_CONFIG, REQUEUE
from paddlerun.trainer.rundir.config import Config, config_from_dict

CONTAINER = "trainer"
CONFIG_DIR = "/etc/paddlerun"
#: Where the shared volume (the PVC) is mounted in every pod.
SHARED_DIR = "/mnt/paddlerun"
GPU_RESOURCE = "nvidia.com/gpu"
#: terminationGracePeriodSeconds = preempt_grace_s + this. After its grace the supervisor
#: still tears the workers down (SIGTERM, 5 s, SIGKILL, 5 s) and writes its summary;
#: Kubernetes' SIGKILL must not cut that short.
GRACE_MARGIN_S = 30
DEFAULT_MASTER_PORT = 29500
#: Kubernetes' own default. A counted failure is a pod whose paddlerun already gave up
#: after its own restarts (supervisor.max_restarts), or crashed.
DEFAULT_BACKOFF_LIMIT = 6
_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


class ManifestError(ValueError):
    """Options that cannot make a working job; the message names the option and the fix."""


@dataclass(frozen=True)
class K8sJob:
    """What ``paddlerun k8s render`` was asked for."""
    name: str
    nodes: int
    image: str
    gpus_per_node: int = 0
    #: A ReadWriteMany PersistentVolumeClaim every pod mounts (checkpoints, run dirs).
    pvc: Optional[str] = None
    namespace: Optional[str] = None
    master_port: int = DEFAULT_MASTER_PORT
    backoff_limit: int = DEFAULT_BACKOFF_LIMIT

    @property
    def job_dir(self) -> str:
        return f"{SHARED_DIR}/{self.name}"

    @property
    def checkpoint_dir(self) -> str:
        return f"{self.job_dir}/checkpoints"

    @property
    def run_dir(self) -> str:
        """One run directory per pod index; the kubelet expands ``$(JOB_COMPLETION_INDEX)``
        in a container's args. A replacement pod takes over its index's directory."""
        return f"{self.job_dir}/pod-$({k8s_env.INDEX})"

    @property
    def master(self) -> str:
        """Pod 0's DNS name through the Service (short form: the pods' DNS search path
        completes it with the namespace and cluster domain)."""
        return f"{self.name}-0.{self.name}:{self.master_port}"

    @property
    def labels(self) -> Dict[str, str]:
        return {"app.kubernetes.io/name": "paddlerun", "app.kubernetes.io/instance": self.name}


def default_name(job_name: str) -> str:
    """``job.name`` as a Kubernetes name: ``mnist_lenet`` -> ``mnist-lenet``."""
    name = re.sub(r"[^a-z0-9-]+", "-", job_name.lower())
    name = re.sub(r"^[^a-z]+", "", name)
    return re.sub(r"-+", "-", name).strip("-")


def render(config: Config, job: K8sJob) -> List[dict]:
    """The ConfigMap, Service and Job, in the order ``kubectl apply -f`` should create them."""
    check(config, job)
    return [config_map(config, job), service(job), indexed_job(config, job)]


def check(config: Config, job: K8sJob) -> None:
    longest = f"{job.name}-{job.nodes - 1}"
    if not _LABEL.match(job.name) or len(longest) > 63:
        raise ManifestError(
            f"--name {job.name!r}: the Job and Service name must be lowercase letters, digits "
            f"and '-', start with a letter, and leave room for the pod hostname {longest!r} "
            f"(at most 63 characters)")
    if job.nodes < 1:
        raise ManifestError(f"--nodes {job.nodes}: must be >= 1")
    if job.gpus_per_node < 0:
        raise ManifestError(f"--gpus-per-node {job.gpus_per_node}: must be >= 0")
    if not 0 < job.master_port < 65536:
        raise ManifestError(f"--master-port {job.master_port}: must be in 1..65535")
    if job.backoff_limit < 0:
        raise ManifestError(f"--backoff-limit {job.backoff_limit}: must be >= 0")
    if job.nodes > 1 and not job.pvc:
        raise ManifestError(
            f"--nodes {job.nodes} needs --pvc CLAIM: every pod must see the same checkpoints "
            f"directory, so a ReadWriteMany PersistentVolumeClaim (NFS, CephFS, a cloud file "
            f"store) mounted by all of them")
    if "SIGTERM" not in config.supervisor.preempt_signals:
        raise ManifestError("supervisor.preempt_signals lacks SIGTERM, the signal Kubernetes stops "
                            "a pod with: the pod would be killed without a snapshot; add it back")
    nproc, device = config.launch.nproc_per_node, config.launch.device
    if job.gpus_per_node and device == "cpu":
        raise ManifestError(f"--gpus-per-node {job.gpus_per_node} but launch.device is cpu; "
                            f"drop one of them")
    if job.gpus_per_node and nproc != "auto" and nproc != job.gpus_per_node:
        raise ManifestError(f"launch.nproc_per_node is {nproc} but --gpus-per-node is "
                            f"{job.gpus_per_node}: one worker per GPU; set "
                            f"launch.nproc_per_node=auto or to {job.gpus_per_node}")
    if device == "gpu" and not job.gpus_per_node:
        raise ManifestError("launch.device is gpu: ask for the GPUs with --gpus-per-node G")


def pod_config(config: Config, job: K8sJob) -> Config:
    """The config every pod runs: checkpoints on the shared volume, placement left to
    each pod's environment, the run directory given on the command line."""
    raw = config.to_dict()
    raw["job"]["run_dir"] = None
    raw["checkpoint"]["dir"] = job.checkpoint_dir
    raw["launch"].update(nnodes=1, node_rank=0, master=None)
    return config_from_dict(raw, source="the rendered config")


def config_map(config: Config, job: K8sJob) -> dict:
    text = yaml.safe_dump(pod_config(config, job).to_dict(), sort_keys=False)
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": _metadata(job, f"{job.name}-config"), "data": {"config.yaml": text}}


def service(job: K8sJob) -> dict:
    return {
        "apiVersion": "v1", "kind": "Service", "metadata": _metadata(job, job.name),
        "spec": {
            "clusterIP": "None",
            "selector": job.labels,
            # Names from the moment a pod has an IP, not once it is Ready: pods wait for
            # pod 0 at start-up, before any readiness.
            "publishNotReadyAddresses": True,
        },
    }


def indexed_job(config: Config, job: K8sJob) -> dict:
    grace = math.ceil(config.supervisor.preempt_grace_s) + GRACE_MARGIN_S
    return {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": _metadata(job, job.name),
        "spec": {
            "completionMode": "Indexed",
            "completions": job.nodes,
            "parallelism": job.nodes,
            "backoffLimit": job.backoff_limit,
            # A replacement pod starts only once the pod it replaces has ended: never two
            # pods of one index (one run directory, one node rank) at a time.
            "podReplacementPolicy": "Failed",
            "podFailurePolicy": {"rules": failure_rules()},
            "template": {
                "metadata": {"labels": job.labels},
                "spec": {
                    "subdomain": job.name,
                    # A failed pod is replaced by the Job (same index), not restarted in
                    # place; podFailurePolicy requires Never.
                    "restartPolicy": "Never",
                    # SIGTERM -> snapshot within supervisor.preempt_grace_s -> exit 75.
                    "terminationGracePeriodSeconds": grace,
                    # No docker-link variables of the namespace's Services: one named
                    # 'paddle...' would put PADDLE_* variables, which Paddle reads, into the pod.
                    "enableServiceLinks": False,
                    "containers": [container(job)],
                    "volumes": volumes(job),
                },
            },
        },
    }


def failure_rules() -> List[dict]:
    """First match wins; a failure no rule matches counts against backoffLimit."""
    return [
        # Evicted, preempted by the scheduler or Kueue, node drained: not the job's fault,
        # whatever the exit code (even a SIGKILL after the grace period).
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        # paddlerun was asked to stop and exited after its snapshot: the replacement resumes.
        {"action": "Ignore", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                             "values": [REQUEUE]}},
        # A bad config or command line is never retried, by paddlerun or by Kubernetes.
        {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                              "values": [BAD_CONFIG]}},
    ]


def container(job: K8sJob) -> dict:
    spec = {
        "name": CONTAINER,
        "image": job.image,
        # Exec form: paddlerun is the container's PID 1 and gets the SIGTERM itself.
        "command": ["paddlerun", "run", f"{CONFIG_DIR}/config.yaml", "--run-dir", job.run_dir],
        "env": [
            {"name": k8s_env.NNODES, "value": str(job.nodes)},
            {"name": k8s_env.MASTER, "value": job.master},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
        ],
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "shared", "mountPath": SHARED_DIR},
            # Docker's 64 MB /dev/shm is too small for NCCL and DataLoader workers.
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
    }
    if job.gpus_per_node:
        spec["resources"] = {"limits": {GPU_RESOURCE: job.gpus_per_node}}
    return spec


def volumes(job: K8sJob) -> List[dict]:
    shared = {"persistentVolumeClaim": {"claimName": job.pvc}} if job.pvc else {"emptyDir": {}}
    return [
        {"name": "config", "configMap": {"name": f"{job.name}-config"}},
        {"name": "shared", **shared},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]


def _metadata(job: K8sJob, name: str) -> dict:
    meta = {"name": name, "labels": job.labels}
    if job.namespace:
        meta["namespace"] = job.namespace
    return meta


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the ConfigMap's config.yaml) as readable ``|`` blocks."""


def _str(dumper, data: str):
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(objects: List[dict]) -> str:
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, default_flow_style=False)

