"""Read each role's container from deploy/base, so tests run exactly what Kubernetes would.

A role's command line, environment, probes and mounted secrets come from its Deployment;
`$(VAR)` references are expanded from the container's own env, as the kubelet does. Not
a test module.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

BASE = Path(__file__).resolve().parent.parent / "deploy" / "base"
# `duet` is the image's console script; here, the same entry point from this checkout
DUET = [sys.executable, "-c", "from frontend.cli import main; main()"]
_REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


@dataclass(frozen=True)
class Probe:
    path: str
    port: int


@dataclass(frozen=True)
class SecretMount:
    secret: str
    mount_path: str
    items: tuple[str, ...] | None  # the keys projected; None: all of them


@dataclass(frozen=True)
class Role:
    """One Deployment's only container, as the kubelet would start it."""

    name: str
    argv: list[str]
    env: dict[str, str]  # plain values
    secret_env: dict[str, tuple[str, str]]  # variable -> (secret name, key)
    probes: dict[str, Probe]  # "readiness" | "liveness" | "startup" -> probe
    secrets: list[SecretMount]

    def command(
        self, secret_values: dict[tuple[str, str], str], mounts: dict[str, str]
    ) -> tuple[list[str], dict[str, str]]:
        """(argv, environment) as the kubelet would start them: `duet` is this checkout's
        entry point, $(VAR) is expanded from the env, and paths under a mount point
        (`mounts`: mount path -> the local folder standing for that volume) point there."""
        env = dict(self.env)
        env.update({var: secret_values[ref] for var, ref in self.secret_env.items()})
        argv = [_REFERENCE.sub(lambda m: env.get(m.group(1), m.group(0)), a) for a in self.argv]

        def local(value: str) -> str:
            for mount, folder in mounts.items():
                if value == mount or value.startswith(mount + "/"):
                    return folder + value[len(mount) :]
            return value

        argv = [local(a) for a in argv]
        env = {k: local(v) for k, v in env.items()}
        return (DUET + argv[1:] if argv[0] == "duet" else argv), env


def deployments(base: Path = BASE) -> dict[str, Role]:
    """Every Deployment under `base` (as listed by its kustomization), by name."""
    listed = yaml.safe_load((base / "kustomization.yaml").read_text())["resources"]
    roles = {}
    for resource in listed:
        for doc in yaml.safe_load_all((base / resource).read_text()):
            if doc and doc["kind"] == "Deployment":
                roles[doc["metadata"]["name"]] = _role(doc)
    return roles


def _role(doc: dict) -> Role:
    spec = doc["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    env, secret_env = {}, {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            secret_env[item["name"]] = (ref["name"], ref["key"])
    probes = {
        kind.removesuffix("Probe"): Probe(p["httpGet"]["path"], int(p["httpGet"]["port"]))
        for kind, p in container.items()
        if kind.endswith("Probe")
    }
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    secrets = []
    for mount in container.get("volumeMounts", []):
        secret = volumes[mount["name"]]["secret"]
        items = tuple(i["key"] for i in secret["items"]) if "items" in secret else None
        secrets.append(SecretMount(secret["secretName"], mount["mountPath"], items))
    return Role(
        doc["metadata"]["name"],
        [*container.get("command", []), *container.get("args", [])],
        env,
        secret_env,
        probes,
        secrets,
    )
