"""deploy/: the manifests hang together, the overlays render and keep the base's commands,
and a worker's --health-port probe says what the manifests expect of it. (The roles'
commands themselves are run by tests/test_disagg_netns.py.)"""

from __future__ import annotations

import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from manifests import BASE, deployments
from server_process import free_port

from decode_workers.health import HealthServer

OVERLAYS = sorted(p.parent for p in (BASE.parent / "overlays").glob("*/kustomization.yaml"))


def containers(docs: list[dict]) -> dict[str, dict]:
    return {
        d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]
        for d in docs
        if d and d["kind"] == "Deployment"
    }


def test_every_probe_targets_a_port_the_container_exposes() -> None:
    docs = [d for f in BASE.glob("*.yaml") for d in yaml.safe_load_all(f.read_text())]
    for name, container in containers(docs).items():
        ports = {p["containerPort"] for p in container.get("ports", [])}
        probes = [v for k, v in container.items() if k.endswith("Probe")]
        assert probes, name
        for probe in probes:
            assert probe["httpGet"]["port"] in ports, (name, probe)


def test_pools_sit_on_their_own_node_pools() -> None:
    for name in ("duet-prefill", "duet-decode"):
        doc = next(
            d
            for d in yaml.safe_load_all((BASE / f"{name.removeprefix('duet-')}.yaml").read_text())
            if d["kind"] == "Deployment"
        )
        pool = name.removeprefix("duet-")
        spec = doc["spec"]["template"]["spec"]
        assert spec["nodeSelector"] == {"duet.io/pool": pool}
        assert {"key": "duet.io/pool", "operator": "Equal", "value": pool,
                "effect": "NoSchedule"} in spec["tolerations"]  # fmt: skip


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_overlays_render_and_keep_the_commands(overlay: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (its built-in kustomize renders the overlays)")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(overlay)], capture_output=True, text=True, check=True
    ).stdout
    rendered_containers = containers(list(yaml.safe_load_all(rendered)))
    base = deployments()
    assert set(rendered_containers) == set(base)
    for name, container in rendered_containers.items():
        assert [*container["command"], *container["args"]] == base[name].argv, name


def status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_worker_health_probe_turns_ready_when_the_worker_has_joined() -> None:
    port = free_port()
    health = HealthServer(port, host="127.0.0.1")
    assert status(f"http://127.0.0.1:{port}/health") == 503  # loading, not joined yet
    health.mark_ready()
    assert status(f"http://127.0.0.1:{port}/health") == 200
    assert status(f"http://127.0.0.1:{port}/other") == 404


def test_readme_containers_run_the_manifests_commands() -> None:
    """README's "Without a cluster" block starts each role with its manifest's own args."""
    readme = (BASE.parent.parent / "README.md").read_text()
    block = readme[readme.index("docker network create duet") :]
    block = block[: block.index("```")].replace("\\\n", " ")
    started = {}
    for line in block.splitlines():
        if "docker run" in line and "--name duet-" in line:
            name = line.split("--name ")[1].split()[0]
            started[name] = line.split("duet:latest ")[1].split()
    loop = started.pop("duet-$role")
    for role in ("prefill", "decode"):
        started[f"duet-{role}"] = [a.replace("$role", role) for a in loop]
    assert started == {name: role.argv[1:] for name, role in deployments().items()}
