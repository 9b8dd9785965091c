"""``paddlerun k8s render``: the manifests of an N-pod job, printed (docs/kubernetes.md)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List

from paddlerun.launcher.usage import UsageError

USAGE = ("paddlerun k8s render CONFIG --nodes N --image IMAGE [--gpus-per-node G] [--pvc CLAIM]\n"
         "       [--namespace NS] [--name NAME] [--master-port PORT] [--backoff-limit B]\n"
         "       [--set KEY=VALUE ...] [-o FILE]")


def add_parser(sub) -> None:
    k8s = sub.add_parser("k8s", help="Kubernetes: render an Indexed Job that restarts, survives "
                                     "preemption and resumes")
    commands = k8s.add_subparsers(dest="k8s_command", required=True, metavar="{render}")
    render = commands.add_parser(
        "render", usage=USAGE, help="print a ConfigMap, a headless Service and an Indexed Job",
        description="Print the YAML of a ConfigMap (the resolved config), a headless Service and "
                    "an Indexed Job of N pods, each running `paddlerun run` as one node; apply "
                    "it with `kubectl apply -f`. Every pod finds its node rank, the number of "
                    "nodes and the master from its environment. Nothing is sent to a cluster.")
    render.add_argument("config", metavar="CONFIG", help="a YAML file, or a shipped config's name")
    render.add_argument("--nodes", type=int, required=True, metavar="N", help="pods (nodes) of the job")
    render.add_argument("--image", required=True,
                        help="a container image with paddlerun and Paddle installed")
    render.add_argument("--gpus-per-node", type=int, default=0, metavar="G",
                        help="request G GPUs (nvidia.com/gpu) per pod; one worker per GPU")
    render.add_argument("--pvc", metavar="CLAIM",
                        help="a ReadWriteMany PersistentVolumeClaim every pod mounts at "
                             "/mnt/paddlerun (checkpoints, run dirs); required for --nodes > 1")
    render.add_argument("--namespace", metavar="NS", help="default: kubectl's current namespace")
    render.add_argument("--name", help="name of the Job and Service (default: job.name, as a "
                                       "Kubernetes name)")
    render.add_argument("--master-port", type=int, metavar="PORT", help="rendezvous port on pod 0 (default 29500)")
    render.add_argument("--backoff-limit", type=int, metavar="B",
                        help="pod failures the Job tolerates (default 6; preemptions and "
                             "evictions do not count)")
    render.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, as for `paddlerun run` (repeatable)")
    render.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    k8s.set_defaults(handler=cmd_k8s)


def cmd_k8s(args, script_args: List[str]) -> int:
    if script_args:
        raise UsageError("`paddlerun k8s` takes no arguments after '--'")
    from paddlerun.cluster import k8s_manifest
    from paddlerun.launcher.cli import find_config
    from paddlerun.trainer.rundir.config import load_config

    config = load_config(find_config(args.config), args.set)
    optional = {"master_port": args.master_port, "backoff_limit": args.backoff_limit}
    job = k8s_manifest.K8sJob(
        name=args.name or k8s_manifest.default_name(config.job.name), nodes=args.nodes,
        image=args.image, gpus_per_node=args.gpus_per_node, pvc=args.pvc,
        namespace=args.namespace, **{k: v for k, v in optional.items() if v is not None})
    try:
        text = k8s_manifest.to_yaml(k8s_manifest.render(config, job))
    except k8s_manifest.ManifestError as e:
        raise UsageError(str(e)) from None
    if not job.pvc:
        print("paddlerun: without --pvc the checkpoints live in the pod (an emptyDir) and go "
              "with it: a replacement pod starts from step 0", file=sys.stderr)
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0
