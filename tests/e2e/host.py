"""Start and stop a real stable-diffusion-webui v1.10.1 for the e2e tests and benchmarks.

The webui is found through SD_WEBUI_PATH (its python: SD_WEBUI_PYTHON, else ../venv/bin/python or venv/bin/python
beside it). Each host gets its own temporary --data-dir (settings, outputs, extensions/ with this checkout linked
in), checkpoint, Lora and embeddings folders; it listens on 127.0.0.1 only and is stopped by PID (its whole
process group), also when a test fails. The known start-up race of webui v1.10.1 ("Cannot add middleware after
an application has started") is retried, three tries in all; no other start failure is.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[2]
MIDDLEWARE_RACE = "Cannot add middleware after an application has started"
START_TRIES = 3

_running: List["WebuiHost"] = []


def webui_path() -> Optional[Path]:
    p = os.environ.get("SD_WEBUI_PATH")
    return Path(p).resolve() if p else None


def served_root(root: Path) -> Path:
    """A webui folder gradio will serve files from. gradio 3.41 answers 403 for any file whose path has a folder
    starting with '.', so a webui under ~/.cache would run without its own JavaScript (no UI at all in a
    browser). Such a webui is mirrored once (about 9 MB: code and repositories, no models or venv) to a
    dot-free folder in /tmp, refreshed when the source's launch.py changes."""
    if not any(part.startswith(".") for part in root.parts[1:]):
        return root
    import hashlib
    import tempfile
    key = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    dest = Path(tempfile.gettempdir()) / f"sd-webui-tune-host-{key}" / "webui"
    stamp = dest.parent / "stamp"
    want = str((root / "launch.py").stat().st_mtime)
    if not (stamp.exists() and stamp.read_text() == want):
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(root, dest, symlinks=True,
                        ignore=shutil.ignore_patterns("venv", "outputs", "log", "__pycache__", "*.safetensors",
                                                      "*.ckpt", "*.pth"))
        stamp.write_text(want)
    return dest


def webui_python(root: Path) -> Path:
    if os.environ.get("SD_WEBUI_PYTHON"):
        return Path(os.environ["SD_WEBUI_PYTHON"])
    for cand in (root.parent / "venv" / "bin" / "python", root / "venv" / "bin" / "python"):
        if cand.exists():
            return cand
    return Path(sys.executable)


def skip_reason() -> Optional[str]:
    """Why the e2e layer cannot run here, or None."""
    root = webui_path()
    if root is None:
        return "SD_WEBUI_PATH is not set (build a host: ../shared/tools/build-webui.sh ../shared/webui-src DEST)"
    if not (root / "launch.py").exists():
        return f"SD_WEBUI_PATH={root} has no launch.py"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StartError(RuntimeError):
    pass


class WebuiHost:
    def __init__(self, workdir: Path, ckpt_dir: Path, extension: bool = True, extra_args: Optional[List[str]] = None,
                 ckpt: Optional[Path] = None):
        source = webui_path()
        self.python = webui_python(source)
        self.root = served_root(source)
        self.workdir = Path(workdir)
        self.data_dir = self.workdir / "data"
        self.ckpt_dir = Path(ckpt_dir)
        self.lora_dir = self.workdir / "Lora"
        self.embeddings_dir = self.workdir / "embeddings"
        self.extension = extension
        self.extra_args = extra_args or []
        self.ckpt = ckpt
        self.port = 0
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = self.workdir / "webui.log"
        self.start_seconds: Optional[float] = None
        self.tries = 0

    # ---- lifecycle ---------------------------------------------------------------------------
    def _prepare_dirs(self):
        for d in (self.data_dir, self.lora_dir, self.embeddings_dir):
            d.mkdir(parents=True, exist_ok=True)
        ext_dir = self.data_dir / "extensions"
        ext_dir.mkdir(exist_ok=True)
        ext = ext_dir / "sd-webui-tune"
        if self.extension and not ext.exists():
            # the working tree as the extension, without .git: a developer checkout may have no 'origin' remote,
            # which the webui reports with a traceback while a user's clone from a URL always has one
            ext.mkdir()
            for item in REPO.iterdir():
                if item.name not in (".git", ".venv", ".venv-oracle", "test-output") and not item.name.startswith(".pytest"):
                    (ext / item.name).symlink_to(item, target_is_directory=item.is_dir())
        if not self.extension and ext.exists():
            shutil.rmtree(ext)

    def command(self) -> List[str]:
        args = [str(self.python), "launch.py", "--skip-prepare-environment", "--skip-torch-cuda-test",
                "--skip-version-check", "--use-cpu", "all", "--no-half", "--precision", "full", "--api",
                "--port", str(self.port), "--server-name", "127.0.0.1", "--no-download-sd-model",
                "--do-not-download-clip", "--data-dir", str(self.data_dir), "--ckpt-dir", str(self.ckpt_dir),
                "--lora-dir", str(self.lora_dir), "--embeddings-dir", str(self.embeddings_dir)]
        if self.ckpt:
            args += ["--ckpt", str(self.ckpt)]
        return args + self.extra_args

    def start(self, timeout: float = 240.0) -> "WebuiHost":
        self._prepare_dirs()
        for attempt in range(1, START_TRIES + 1):
            self.tries = attempt
            self.port = free_port()
            env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
                       PYTHONUNBUFFERED="1")
            env.pop("PYTHONPATH", None)
            log = open(self.log_path, "a")
            log.write(f"\n===== start try {attempt}: {' '.join(self.command())}\n")
            log.flush()
            t0 = time.monotonic()
            self.proc = subprocess.Popen(self.command(), cwd=self.root, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
            log.close()
            _running.append(self)
            record = os.environ.get("TUNE_E2E_PIDS")  # .ci/run checks these process groups, and only these
            if record:
                with open(record, "a") as f:
                    f.write(f"{self.proc.pid}\n")
            try:
                self._wait_ready(timeout)
                self.start_seconds = time.monotonic() - t0
                return self
            except StartError:
                self.stop()
                if MIDDLEWARE_RACE in self._log_tail(20000) and attempt < START_TRIES:
                    print(f"[e2e] webui start try {attempt} hit the v1.10.1 middleware race; starting it again",
                          file=sys.stderr)
                    with open(self.log_path, "a") as f:
                        f.write(f"\n[e2e] try {attempt} hit '{MIDDLEWARE_RACE}': retrying\n")
                    continue
                raise
        raise StartError("unreachable")

    def current_log(self) -> str:
        """The console output of the running webui (the last start try only)."""
        text = self._log_tail(10 ** 9)
        return text[text.rfind("===== start try"):]

    def _log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def _wait_ready(self, timeout: float):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StartError(f"webui exited with code {self.proc.returncode}; log tail:\n{self._log_tail()}")
            # the checkpoint loads in a background thread, and extensions' app_started callbacks (their API
            # routes) run just before the webui prints its startup time: wait for both
            log = self.current_log()
            if "Model loaded in" in log and "Startup time:" in log:
                try:
                    self.get("/sdapi/v1/options", timeout=5)
                    return
                except (urllib.error.URLError, ConnectionError, OSError, ValueError):
                    pass
            time.sleep(0.5)
        raise StartError(f"webui not ready after {timeout:.0f} s; log tail:\n{self._log_tail()}")

    def stop(self):
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=15)
        # children that left the group are not expected; make sure none of the group survives
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc = None
        if self in _running:
            _running.remove(self)

    # ---- HTTP --------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(self, method: str, path: str, payload=None, timeout: float = 300):
        data = json.dumps(payload).encode() if payload is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
        return json.loads(body) if body else None

    def get(self, path: str, timeout: float = 60):
        return self.request("GET", path, timeout=timeout)

    def post(self, path: str, payload=None, timeout: float = 300):
        return self.request("POST", path, payload if payload is not None else {}, timeout=timeout)

    def set_options(self, **opts):
        return self.post("/sdapi/v1/options", opts)

    def load_checkpoint(self, name: str):
        """Switch the loaded checkpoint by its title or file name and wait until the webui reports it."""
        self.set_options(sd_model_checkpoint=name)
        cur = self.get("/sdapi/v1/options")["sd_model_checkpoint"]
        if Path(name).stem not in cur:
            raise AssertionError(f"checkpoint {name!r} not loaded; webui reports {cur!r}")

    def txt2img(self, prompt: str, seed: int = 1, steps: int = 4, size: int = 64, **extra) -> Dict:
        payload = dict(prompt=prompt, seed=seed, steps=steps, width=size, height=size, cfg_scale=5,
                       sampler_name="Euler", batch_size=1, n_iter=1)
        payload.update(extra)
        return self.post("/sdapi/v1/txt2img", payload)


def stop_all():
    for host in list(_running):
        host.stop()


atexit.register(stop_all)


def _on_signal(signum, frame):
    """SIGTERM/SIGHUP (a CI time-out, a killed test run) skip atexit: stop the webuis first, then die as asked."""
    stop_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


for _sig in (signal.SIGTERM, signal.SIGHUP):
    if signal.getsignal(_sig) in (signal.SIG_DFL, None):
        signal.signal(_sig, _on_signal)
