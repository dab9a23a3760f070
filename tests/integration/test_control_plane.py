"""The local control plane is a real Kubernetes API: versioned, authorizing, and stoppable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from kubernetes import client

from vram_operator.localcluster import (
    KUBE_VERSION,
    BinariesNotFoundError,
    ControlPlaneError,
    LocalControlPlane,
)

Kubectl = Callable[..., subprocess.CompletedProcess[str]]

pytestmark = pytest.mark.integration


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_server_answers_version(
    control_plane: LocalControlPlane, k8s_client: client.ApiClient
) -> None:
    info = client.VersionApi(k8s_client).get_code()
    assert info.major == "1"
    if not control_plane.use_existing:
        assert info.git_version == f"v{KUBE_VERSION}"


def test_objects_round_trip_through_etcd(k8s_client: client.ApiClient) -> None:
    core = client.CoreV1Api(k8s_client)
    name = "vram-roundtrip"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    try:
        core.create_namespaced_config_map(
            name,
            client.V1ConfigMap(metadata=client.V1ObjectMeta(name="cm"), data={"k": "v"}),
        )
        assert core.read_namespaced_config_map("cm", name).data == {"k": "v"}
    finally:
        core.delete_namespace(name)


def test_rbac_is_enforced(kubectl: Kubectl) -> None:
    admin = kubectl("auth", "can-i", "create", "pods")
    assert admin.stdout.strip() == "yes", admin.stderr

    nobody = kubectl("auth", "can-i", "create", "pods", "--as=system:serviceaccount:default:nobody")
    assert nobody.stdout.strip() == "no", nobody.stderr
    assert nobody.returncode == 1


def test_existing_cluster_mode_starts_nothing(control_plane: LocalControlPlane) -> None:
    env = {
        "VRAM_USE_EXISTING_CLUSTER": "true",
        "KUBECONFIG": str(control_plane.kubeconfig),
        "PATH": os.environ.get("PATH", ""),
    }
    with LocalControlPlane(env=env) as cp:
        assert cp.use_existing
        assert cp.pids == []
        assert cp.kubeconfig == control_plane.kubeconfig
        assert cp.server == control_plane.server


def test_missing_binaries_name_the_install_script(tmp_path: Path) -> None:
    cp = LocalControlPlane(env={"KUBEBUILDER_ASSETS": str(tmp_path), "PATH": ""})
    with pytest.raises(BinariesNotFoundError, match=r"install-control-plane\.sh"):
        cp.start()
    cp.stop()


def test_stop_kills_exactly_its_processes(control_plane: LocalControlPlane) -> None:
    if control_plane.use_existing:
        pytest.skip("starts its own control plane; not meaningful against an existing cluster")
    cp = LocalControlPlane(use_existing=False)
    cp.start()
    pids = cp.pids
    state_dir = cp.state_dir
    assert len(pids) == 2
    assert all(_pid_alive(p) for p in pids)
    assert cp.kubectl("get", "namespace", "default").returncode == 0

    cp.stop()
    cp.stop()  # idempotent
    assert not any(_pid_alive(p) for p in pids)
    assert state_dir is not None
    assert not state_dir.exists()
    # The session's control plane is untouched.
    assert control_plane.running


def test_cli_prints_kubeconfig_and_stops_on_sigint(
    control_plane: LocalControlPlane, tmp_path: Path
) -> None:
    if control_plane.use_existing:
        pytest.skip("starts its own control plane; not meaningful against an existing cluster")
    env = {k: v for k, v in os.environ.items() if k != "VRAM_USE_EXISTING_CLUSTER"}
    state = tmp_path / "state"
    stderr_path = tmp_path / "stderr.txt"
    with stderr_path.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vram_operator.localcluster", "--state-dir", str(state)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=env,
        )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line == f"export KUBECONFIG={state / 'kubeconfig'}", stderr_path.read_text()
        kubeconfig = line.removeprefix("export KUBECONFIG=")
        got = subprocess.run(
            [str(control_plane.binaries.kubectl), "--kubeconfig", kubeconfig,
             "get", "namespace", "default", "-o", "name"],
            capture_output=True, text=True, check=False, timeout=60,
        )  # fmt: skip
        assert got.stdout.strip() == "namespace/default", got.stderr
        children = set(_pids_mentioning(str(state))) - {proc.pid}
        assert len(children) == 2  # etcd and kube-apiserver

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, stderr_path.read_text()
        deadline = time.monotonic() + 5
        while _pids_mentioning(str(state)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _pids_mentioning(str(state)) == []
        assert "stopping the control plane" in stderr_path.read_text()
        assert (state / "kubeconfig").is_file()  # a --state-dir is kept
    finally:
        if proc.poll() is None:
            proc.terminate()  # lets it stop its children; kill only as a last resort
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.communicate(timeout=30)


def _pids_mentioning(text: str) -> list[int]:
    """Pids of live processes whose command line contains ``text`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        zombie = stat.rsplit(")", 1)[-1].split()[0] == "Z"
        if text in cmdline and not zombie and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return found


def test_children_die_with_a_killed_parent(
    control_plane: LocalControlPlane, tmp_path: Path
) -> None:
    if control_plane.use_existing:
        pytest.skip("starts its own control plane; not meaningful against an existing cluster")
    env = {k: v for k, v in os.environ.items() if k != "VRAM_USE_EXISTING_CLUSTER"}
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vram_operator.localcluster", "--state-dir", str(state)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("export KUBECONFIG=")
        children = set(_pids_mentioning(str(state))) - {proc.pid}
        assert len(children) == 2
    finally:
        proc.kill()  # no chance to clean up: the kernel must take the children down
        proc.communicate(timeout=30)
    deadline = time.monotonic() + 20
    while set(_pids_mentioning(str(state))) & children and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not set(_pids_mentioning(str(state))) & children


def test_startup_failure_reports_the_log_tail() -> None:
    cp = LocalControlPlane(use_existing=False, extra_apiserver_args=["--no-such-flag"])
    with pytest.raises(ControlPlaneError, match=r"(?s)kube-apiserver exited.*no-such-flag"):
        cp.start()
    assert cp.pids == []
    cp.stop()
