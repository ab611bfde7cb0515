"""Start the `tritonserver` that ships in the `nvidia-pytriton` wheel on a model repository.

NVIDIA's Triton container needs none of this (`tritonserver --model-repository REPO`). The wheel's
server needs three things arranged, which this module does:

- its shared libraries (`nvidia_pytriton.libs` beside the package) on LD_LIBRARY_PATH, and this Python's
  own `libpython3.X.so` first, so the Python backend's stub embeds the same interpreter build;
- a backend folder holding the Python backend and the stub built for this Python version (the wheel keeps
  one stub per version under `python_backend_stubs/`);
- a Python environment for the stub: it embeds Python with the environment ignored (PYTHONPATH has no
  effect) and finds its `sys.prefix` through the `python3` on PATH. The stub's pybind11 reads numpy 1.x
  array structures, so with numpy 2 in the virtualenv, strings arrive garbled and the stub dies
  ("unpack_from requires a buffer of at least 252645139 bytes"). The stub environment is a second,
  empty virtualenv holding numpy<2 that adds the main site-packages after its own.

    python -m leptonc.triton_server REPO [--http-port 8000 --grpc-port 8001 --metrics-port 8002]
    python -m leptonc.triton_server --prepare      # only create the stub environment (`make setup` does)
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from leptonc.errors import BackendUnavailableError, LeptonError

PYTRITON_SPEC = "nvidia-pytriton==0.7.0"
STUB_NUMPY_SPEC = "numpy>=1.26,<2"
STUB_ENV_DIR = Path(sys.prefix) / "triton-stub-env"
_INSTALL_HINT = f"pip install --no-deps {PYTRITON_SPEC} (it ships tritonserver and the Python backend)"


class TritonServerError(LeptonError):
    """tritonserver did not start or did not become ready. Exit 5."""

    exit_code = 5


@dataclass(frozen=True)
class TritonRuntime:
    """What a `tritonserver` from the wheel needs to run: the binary, a backend folder, an environment."""

    binary: Path
    backend_dir: Path
    env: dict

    def argv(self, repo: Path, http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
             extra: tuple[str, ...] = ()) -> list[str]:
        return [str(self.binary), "--model-repository", str(repo), "--backend-directory", str(self.backend_dir),
                "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
                "--allow-metrics", "true", *extra]


def wheel_server_dir() -> Path:
    """The `tritonserver/` folder of the installed nvidia-pytriton wheel (without importing pytriton)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise BackendUnavailableError("tritonserver is not installed here", hint=_INSTALL_HINT)
    folder = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    if not (folder / "bin" / "tritonserver").is_file():
        raise BackendUnavailableError(f"{folder} has no bin/tritonserver", hint=_INSTALL_HINT)
    return folder


def _numpy_major() -> int:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return int(version("numpy").split(".")[0])
    except PackageNotFoundError:
        return 0


def stub_python_env(env_dir: Path = STUB_ENV_DIR) -> Path:
    """The prefix whose `bin/python3` the stub should find: this environment when its numpy is 1.x, else a
    second virtualenv (created once, here) with numpy<2 ahead of this environment's site-packages."""
    if _numpy_major() < 2:
        return Path(sys.prefix)
    site = env_dir / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    marker = site / "leptonc-main-env.pth"
    if marker.is_file() and any(site.glob("numpy-1.*.dist-info")):
        return env_dir
    base_python = getattr(sys, "_base_executable", sys.executable)
    try:
        subprocess.run([base_python, "-m", "venv", "--without-pip", "--clear", str(env_dir)], check=True,
                       capture_output=True, text=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                        STUB_NUMPY_SPEC], check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as e:
        raise BackendUnavailableError(f"could not prepare the Python environment for Triton's Python backend in "
                                      f"{env_dir}: {(e.stderr or e.stdout or '').strip()[-500:]}",
                                      hint=f"install {STUB_NUMPY_SPEC} there by hand: pip install --target {site} "
                                           f"'{STUB_NUMPY_SPEC}'") from None
    main_sites = [p for p in sysconfig.get_paths().values() if p.endswith("site-packages")]
    lines = "".join(f"import site; site.addsitedir({p!r})\n" for p in dict.fromkeys(main_sites))
    marker.write_text(lines, encoding="utf-8")
    return env_dir


def prepare_runtime(work_dir: Path, stub_env_dir: Path = STUB_ENV_DIR) -> TritonRuntime:
    """Arrange the wheel's server to run from `work_dir` (a backend folder with this Python's stub)."""
    server = wheel_server_dir()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        have = sorted(p.name for p in (server / "python_backend_stubs").iterdir())
        raise BackendUnavailableError(f"the wheel's Python backend has no stub for Python {version} "
                                      f"(it has {', '.join(have)})", hint="run leptonc under one of those versions")
    backend_dir = Path(work_dir) / "backends"
    python_backend = backend_dir / "python"
    python_backend.mkdir(parents=True, exist_ok=True)
    for src in (server / "backends" / "python" / "libtriton_python.so",
                server / "backends" / "python" / "triton_python_backend_utils.py", stub):
        shutil.copy2(src, python_backend / src.name)
    libs = [server.parent.parent / "nvidia_pytriton.libs"]
    libpython_dir = Path(sysconfig.get_config_var("LIBDIR") or "")
    if (libpython_dir / f"libpython{version}.so.1.0").is_file():
        libs.insert(0, libpython_dir)
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join([*map(str, libs), *filter(None, [env.get("LD_LIBRARY_PATH")])])
    env["PATH"] = f"{stub_python_env(stub_env_dir) / 'bin'}:{env.get('PATH', '')}"
    return TritonRuntime(server / "bin" / "tritonserver", backend_dir, env)


class TritonServer:
    """One `tritonserver` process in a session of its own: `stop()` ends it and every stub it started."""

    def __init__(self, runtime: TritonRuntime, repo: Path, log_path: Path, *, http_port: int, grpc_port: int,
                 metrics_port: int, extra: tuple[str, ...] = ()):
        self.http_url = f"http://127.0.0.1:{http_port}"
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(runtime.argv(repo, http_port, grpc_port, metrics_port, extra),
                                        env=runtime.env, stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        """Until /v2/health/ready answers 200; raises with the log's end if the server exits or times out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TritonServerError(f"tritonserver exited with code {self.process.returncode} before it was "
                                        f"ready; its log ends:\n{self.log()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.25)
        raise TritonServerError(f"tritonserver was not ready after {timeout_s:.0f} s; its log ends:\n"
                                f"{self.log()[-3000:]}")

    def wait_exit(self, timeout_s: float) -> int:
        return self.process.wait(timeout=timeout_s)

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGINT to the process group (Triton unloads its models and stops its stubs), SIGKILL to whatever
        of the group is left after `timeout_s`. Returns the server's exit code."""
        pgid = self.process.pid
        if self.process.poll() is None:
            _signal_group(pgid, signal.SIGINT)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _signal_group(pgid, signal.SIGKILL)
                self.process.wait(timeout=10)
        deadline = time.monotonic() + 10
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if group_members(pgid):
            _signal_group(pgid, signal.SIGKILL)
        self._log.close()
        return self.process.returncode

    def __enter__(self) -> "TritonServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def main(argv: list[str] | None = None) -> int:
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m leptonc.triton_server",
                                     description="Run the nvidia-pytriton wheel's tritonserver on a model repository.")
    parser.add_argument("repository", type=Path, nargs="?")
    parser.add_argument("--prepare", action="store_true", help="only prepare the stub's Python environment")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("extra", nargs="*", help="further tritonserver options, after --")
    args = parser.parse_args(argv)
    if not args.prepare and args.repository is None:
        parser.error("give the model repository (or --prepare)")
    try:
        if args.prepare:
            wheel_server_dir()
            print(f"the Python backend's stub will run in {stub_python_env()}")
            return 0
        runtime = prepare_runtime(Path(tempfile.mkdtemp(prefix="leptonc-triton-")))
    except LeptonError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    command = runtime.argv(args.repository, args.http_port, args.grpc_port, args.metrics_port, tuple(args.extra))
    os.execve(command[0], command, runtime.env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
