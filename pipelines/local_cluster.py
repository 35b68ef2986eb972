"""A Ray head and an MLflow tracking server on this machine, for trying the cluster path.

    eval "$(python -m pipelines.local_cluster up)"   # ray start --head + mlflow server on 127.0.0.1;
                                                     # exports RAY_ADDRESS, RAY_AUTH_MODE, MLFLOW_TRACKING_URI
    ray job submit --working-dir . --runtime-env-json "{\\"env_vars\\": {\\"MLFLOW_TRACKING_URI\\": \\"$MLFLOW_TRACKING_URI\\"}}" \\
        -- python -m pipelines.pretrain --config pipelines/configs/quickstart.yaml
    python -m pipelines.local_cluster down    # stops exactly what ``up`` started

``up`` runs ``ray start --head --block`` and ``mlflow server`` as child processes of their own and
records their process ids in ``.cluster/`` (``SSCL_CLUSTER_DIR``; ports from ``SSCL_RAY_PORT``,
``SSCL_DASHBOARD_PORT``, ``SSCL_MLFLOW_PORT`` or the flags); ``down`` signals those two (``ray start --block`` stops
the Ray processes it started), so other Ray clusters on the machine are left alone, unlike
``ray stop``. Ray's token authentication stays on: the token is in ``~/.ray/auth_token`` and
clients need ``RAY_AUTH_MODE=token`` (written to ``.cluster/env``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence

STATE = Path(".cluster")


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) != 0


def _wait_http(url: str, timeout_s: float, proc: subprocess.Popen, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(url, timeout=2):  # noqa: S310 - loopback http
                return
        except urllib.error.HTTPError:
            return  # it answered (Ray's dashboard asks for the auth token: 401)
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{what} did not answer {url} within {timeout_s:.0f} s; see {log}")


def _wait_for_jobs(address: str, timeout_s: float) -> None:
    """Submits a no-op job until the head's job agent takes it: the dashboard answers before the
    agent is up, and a `ray job submit` in between fails with "No available agent"."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            job = client.submit_job(entrypoint="true")
            break
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise RuntimeError(f"the Ray head at {address} does not take jobs: {err}") from None
            time.sleep(1)
    while client.get_job_status(job) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Ray head at {address} did not run a no-op job within {timeout_s:.0f} s")
        time.sleep(0.5)


def _bin(name: str) -> str:
    """The console script next to this interpreter (the project's venv), else from PATH."""
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else name


def up(state: Path = STATE, *, ray_port: int = 6379, dashboard_port: int = 8265, mlflow_port: int = 5000,
       num_cpus: int | None = None, host: str = "127.0.0.1") -> dict[str, str]:
    """Starts the Ray head and the MLflow server; returns the client environment.

    Raises:
        RuntimeError: if a port is taken, a cluster from ``state`` is still up, or a server does
            not come up (what was started is stopped again).
    """
    state = state.resolve()
    if (state / "pids.json").exists():
        raise RuntimeError(f"{state}/pids.json exists: a local cluster is up; run `python -m pipelines.local_cluster down`")
    taken = [p for p in (ray_port, dashboard_port, mlflow_port) if not _free(p, host)]
    if taken:
        raise RuntimeError(f"port(s) {taken} on {host} are in use; pass other --*-port values")
    state.mkdir(parents=True, exist_ok=True)
    cpus = num_cpus or max(4, os.cpu_count() or 1)  # small machines: more logical CPUs than cores
    # Ray's session folder holds unix sockets, whose paths must stay under 108 bytes: a short one.
    ray_temp = Path(tempfile.gettempdir()) / f"sscl-ray-{ray_port}"
    ray_cmd = [_bin("ray"), "start", "--head", "--block", "--port", str(ray_port), "--node-ip-address", host,
               "--dashboard-host", host, "--dashboard-port", str(dashboard_port), "--num-cpus", str(cpus),
               "--temp-dir", str(ray_temp), "--disable-usage-stats"]
    mlflow_cmd = [_bin("mlflow"), "server", "--backend-store-uri", f"sqlite:///{state}/mlflow.db",
                  "--artifacts-destination", str(state / "mlartifacts"), "--host", host, "--port", str(mlflow_port),
                  "--workers", "1"]
    started: dict[str, int] = {}
    try:
        for name, cmd in (("ray", ray_cmd), ("mlflow", mlflow_cmd)):
            log = open(state / f"{name}.log", "w")  # noqa: SIM115 - owned by the child from here on
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            started[name] = proc.pid
            (state / "pids.json").write_text(json.dumps(started))
            health = (f"http://{host}:{dashboard_port}/api/version" if name == "ray"
                      else f"http://{host}:{mlflow_port}/health")
            _wait_http(health, 120, proc, " ".join(cmd[:2]), state / f"{name}.log")
            if name == "ray":
                _wait_for_jobs(f"http://{host}:{dashboard_port}", 120)
    except BaseException:
        down(state)
        raise
    (state / "ray_temp_dir").write_text(str(ray_temp))  # Ray's logs stay there after `down`
    env = {"RAY_ADDRESS": f"http://{host}:{dashboard_port}", "RAY_AUTH_MODE": "token",
           "MLFLOW_TRACKING_URI": f"http://{host}:{mlflow_port}"}
    (state / "env").write_text("".join(f"export {k}={v}\n" for k, v in env.items()))
    return env


def down(state: Path = STATE, timeout_s: float = 60) -> list[str]:
    """Stops the processes ``up`` recorded (SIGTERM, then SIGKILL); returns what was stopped."""
    record = state / "pids.json"
    if not record.exists():
        return []
    stopped = []
    for name, pid in json.loads(record.read_text()).items():
        try:
            if name == "ray":
                os.kill(pid, signal.SIGTERM)  # `ray start --block` drains the node and stops what it started
            else:
                os.killpg(pid, signal.SIGTERM)  # its own session: the server and its workers
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.5)
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)
        stopped.append(name)
    record.unlink()
    (state / "env").unlink(missing_ok=True)
    return stopped


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited:
            return False
    except ChildProcessError:
        pass  # not our child (started by an earlier `up`)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def _port(text: str) -> int:
    """A TCP port number, 1-65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port}: a port is 1-65535")
    return port


def cli(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.local_cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("up", "down"))
    parser.add_argument("--state", default=os.environ.get("SSCL_CLUSTER_DIR", str(STATE)),
                        help="folder for pids, logs, the MLflow store (default .cluster)")
    parser.add_argument("--ray-port", type=_port, default=_env_int("SSCL_RAY_PORT", 6379))
    parser.add_argument("--dashboard-port", type=_port, default=_env_int("SSCL_DASHBOARD_PORT", 8265),
                        help="also the Ray Jobs address")
    parser.add_argument("--mlflow-port", type=_port, default=_env_int("SSCL_MLFLOW_PORT", 5000))
    parser.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of the head (default max(4, cores))")
    parser.add_argument("--host", default="127.0.0.1", help="address the servers bind to (default loopback only)")
    args = parser.parse_args(argv)
    if args.action == "down":
        stopped = down(Path(args.state))
        print(f"stopped: {', '.join(stopped) or 'nothing was running'}", file=sys.stderr)
        return
    try:
        env = up(Path(args.state), ray_port=args.ray_port, dashboard_port=args.dashboard_port,
                 mlflow_port=args.mlflow_port, num_cpus=args.num_cpus, host=args.host)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    # stdout carries only the exports, for eval "$(python -m pipelines.local_cluster up)".
    print(f"Ray head and MLflow server up; their logs and pids are in {args.state}/", file=sys.stderr)
    for key, value in env.items():
        print(f"export {key}={value}")


if __name__ == "__main__":
    cli()
