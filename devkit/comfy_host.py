"""Starting a real ComfyUI server with this pack, and talking to it over HTTP.

Each run gets its own base directory (models/, input/, output/, custom_nodes/ with the pack
linked in), so tests and the demo never touch a user's ComfyUI folders. The server is started
the way users start it: ``python main.py --listen 127.0.0.1 --port N``.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .comfy_path import comfyui_path

PACK_DIR = Path(__file__).resolve().parent.parent
PACK_LINK_NAME = "lora-lab"


def comfyui_dir() -> Path:
    """The ComfyUI checkout to run (see comfy_path.comfyui_path)."""
    path = comfyui_path()
    if not (path / "main.py").is_file():
        raise RuntimeError(f"no ComfyUI at {path}: run scripts/setup_host.sh (or set COMFYUI_PATH)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_base_directory(base: Path, checkpoints: list[Path] = (), input_folders: dict[str, Path] | None = None) -> Path:
    """A ComfyUI base directory with the pack linked into custom_nodes/ and fixtures linked in."""
    for sub in ("custom_nodes", "models/checkpoints", "models/loras", "input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_LINK_NAME
    if not link.exists():
        link.symlink_to(PACK_DIR, target_is_directory=True)
    for ckpt in checkpoints:
        dest = base / "models" / "checkpoints" / ckpt.name
        if not dest.exists():
            dest.symlink_to(ckpt.resolve())
    for name, folder in (input_folders or {}).items():
        dest = base / "input" / name
        if not dest.exists():
            dest.symlink_to(folder.resolve(), target_is_directory=True)
    return base


@dataclass
class ComfyServer:
    """A running ComfyUI process; use as a context manager or call start()/stop()."""

    base_dir: Path
    port: int = field(default_factory=free_port)
    log_path: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 240.0) -> "ComfyServer":
        comfy = comfyui_dir()
        self.log_path = self.log_path or self.base_dir / "comfyui.log"
        cmd = [sys.executable, "-u", "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base_dir), "--database-url", "sqlite:///:memory:",
               "--disable-api-nodes", "--disable-auto-launch", *self.extra_args]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._log_file = open(self.log_path, "w", encoding="utf-8")
        self.process = subprocess.Popen(cmd, cwd=comfy, stdout=self._log_file, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.process.returncode}; log:\n{self.log_text()[-4000:]}")
            try:
                self.get_json("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f}s; log:\n{self.log_text()[-4000:]}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if getattr(self, "_log_file", None):
            self._log_file.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path and self.log_path.exists() else ""

    def is_alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # --- HTTP ---
    def get_json(self, path: str, timeout: float = 30.0):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post_json(self, path: str, payload: dict, timeout: float = 30.0):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = r.read()
                return json.loads(body) if body else None
        except urllib.error.HTTPError as e:
            raise PromptRejected(e.code, json.loads(e.read() or b"{}")) from None

    def queue_prompt(self, prompt: dict) -> str:
        """Queues a prompt; raises PromptRejected if any node failed validation (ComfyUI would
        otherwise quietly run only the outputs that validated)."""
        reply = self.post_json("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
        if reply.get("node_errors"):
            raise PromptRejected(200, reply)
        return reply["prompt_id"]

    def wait_for(self, prompt_id: str, timeout: float = 1800.0) -> dict:
        """Polls /history until the prompt finished (success, error or interrupt)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get_json(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                return entry
            if not self.is_alive():
                raise RuntimeError(f"ComfyUI died while running {prompt_id}; log:\n{self.log_text()[-4000:]}")
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout:.0f}s")

    def run_prompt(self, prompt: dict, timeout: float = 1800.0) -> dict:
        return self.wait_for(self.queue_prompt(prompt), timeout)


class PromptRejected(Exception):
    """/prompt refused the graph (validation error)."""

    def __init__(self, status: int, body: dict):
        super().__init__(f"HTTP {status}: {json.dumps(body)[:2000]}")
        self.status = status
        self.body = body


def execution_error(entry: dict) -> dict | None:
    """The execution_error message of a history entry, if the prompt failed."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return data
    return None
