"""Start a rendered Job's pods on this machine the way Kubernetes would start them.

What the Job controller and the kubelet would do, and what stands in for the rest:

- the container's ``env`` from the manifest, plus ``JOB_COMPLETION_INDEX`` (the Job
  controller adds it to every pod of an Indexed Job), on top of this machine's environment;
- ``$(VAR)`` in ``command`` expanded from that environment, as the kubelet does;
- each volume mount is a local directory: the PVC one shared by every pod, an emptyDir
  one per pod, the ConfigMap's files written into theirs; paths under a mount path, in
  the command, the environment and the ConfigMap's files, point into those directories;
- the cluster DNS: ``dns`` maps a host name (pod 0's name through the Service) to a name
  this machine resolves (``localhost``) wherever it appears in an environment value;
- the image's ``paddlerun`` is this checkout's, under this Python.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Mapping, Tuple

import yaml

from helpers import REPO


def objects(manifest: str) -> Dict[str, dict]:
    """kind -> object of a rendered manifest."""
    return {doc["kind"]: doc for doc in yaml.safe_load_all(manifest) if doc}


def expand(text: str, env: Mapping[str, str]) -> str:
    """The kubelet's ``$(VAR)`` expansion: a defined VAR is replaced, ``$$`` is ``$``,
    anything else stays as written."""
    def one(match):
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, text)


class LocalPods:
    def __init__(self, manifest: str, root: Path, dns: Mapping[str, str]):
        self.objects = objects(manifest)
        self.root = Path(root)
        self.dns = dict(dns)
        pod = self.objects["Job"]["spec"]["template"]["spec"]
        (self.container,) = pod["containers"]
        self.volumes = {v["name"]: v for v in pod["volumes"]}

    def mounts(self, index: int) -> Dict[str, Path]:
        """mountPath -> the local directory standing in for it in pod ``index``."""
        found = {}
        for mount in self.container["volumeMounts"]:
            volume = self.volumes[mount["name"]]
            if "persistentVolumeClaim" in volume:  # the same files in every pod
                local = self.root / "pvc" / volume["persistentVolumeClaim"]["claimName"]
            else:  # emptyDir, configMap: the pod's own
                local = self.root / f"pod-{index}" / mount["name"]
            local.mkdir(parents=True, exist_ok=True)
            found[mount["mountPath"]] = local
        return found

    def localize(self, text: str, mounts: Mapping[str, Path]) -> str:
        for path in sorted(mounts, key=len, reverse=True):
            text = re.sub(re.escape(path) + r"(?=/|$|\s)", str(mounts[path]), text)
        return text

    def command(self, index: int) -> Tuple[List[str], Dict[str, str]]:
        mounts = self.mounts(index)
        for mount in self.container["volumeMounts"]:
            volume = self.volumes[mount["name"]]
            if "configMap" in volume:
                data = self.objects["ConfigMap"]
                assert data["metadata"]["name"] == volume["configMap"]["name"]
                for key, text in data["data"].items():
                    (mounts[mount["mountPath"]] / key).write_text(self.localize(text, mounts))
        pod_env = {e["name"]: e["value"] for e in self.container["env"]}
        pod_env["JOB_COMPLETION_INDEX"] = str(index)
        for name, value in pod_env.items():
            for host, address in self.dns.items():
                value = value.replace(host, address)
            pod_env[name] = self.localize(value, mounts)
        argv = [self.localize(expand(part, pod_env), mounts) for part in self.container["command"]]
        assert argv[0] == "paddlerun", argv
        return [sys.executable, "-m", "paddlerun.launcher.cli", *argv[1:]], pod_env

    def start(self, index: int, log: Path) -> subprocess.Popen:
        """Pod ``index``'s container, in its own session (its PID 1 gets the signals)."""
        argv, pod_env = self.command(index)
        with open(log, "w") as out:
            return subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, env={**os.environ, **pod_env})
