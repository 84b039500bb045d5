"""The environment of the gRPC tests (`test_real_grpc.py`), set by run.sh's gRPC phase or by
hand:

- `REAL_VLLM_GRPC_URL`: the engine, `grpc://127.0.0.1:PORT` (`real-vllm.sh start --grpc`);
  unset: the gRPC tests are skipped;
- `REAL_VLLM_URLS` (first entry): vLLM's own HTTP server on the same model, with the same
  served name, the reference every answer is judged by;
- `REAL_VLLM_TOKENIZER`: the model directory (tokenizer.json, tokenizer_config.json) given to
  the front end as `--model-path`; unset: the front end fetches the tokenizer from the engine;
- `REAL_VLLM_GRPC_LOG`: the engine's log (the abort test reads what it says about aborts);
- `REAL_VLLM_GRPC_PYTHON`: a Python with grpcio and smg-grpc-proto, for the witness on the
  engine (`grpc_probe.py`); default `$VLLM_ROOT/venv/bin/python` (the real-vLLM venv);
- `REAL_VLLM_GRPC_FRONTEND`: `ringrouter` (default: `target/$RINGROUTER_PROFILE/ringrouter`)
  or `smg` (PyPI `smg` 1.13, the Shepherd Model Gateway: the same role, to check that the
  tests judge soundly; its executable from `REAL_VLLM_SMG`, else `smg` on PATH), or the URL
  of an OpenAI server already running (`http://127.0.0.1:8501`: vLLM's HTTP server judged
  by itself, which must pass every comparison: the check of the checks; the tests that
  watch the gRPC engine or start a front end of their own are skipped then);
- `REAL_VLLM_GRPC_FRONTEND_ARGS`: extra flags for the front end (shell words)."""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path

from helpers import Router, Smg

GRPC_URL = os.environ.get("REAL_VLLM_GRPC_URL", "").strip()
FRONTEND = os.environ.get("REAL_VLLM_GRPC_FRONTEND", "ringrouter").strip() or "ringrouter"
TOKENIZER = os.environ.get("REAL_VLLM_TOKENIZER", "").strip()
GRPC_LOG = os.environ.get("REAL_VLLM_GRPC_LOG", "").strip()
FRONTEND_ARGS = shlex.split(os.environ.get("REAL_VLLM_GRPC_FRONTEND_ARGS", ""))


def grpc_python() -> str | None:
    p = os.environ.get("REAL_VLLM_GRPC_PYTHON", "").strip()
    if not p and os.environ.get("VLLM_ROOT"):
        p = str(Path(os.environ["VLLM_ROOT"]) / "venv" / "bin" / "python")
    return p if p and Path(p).exists() else None


def smg_exe() -> str | None:
    p = os.environ.get("REAL_VLLM_SMG", "").strip()
    if p:
        return p if Path(p).exists() else None
    return shutil.which("smg")


class External:
    """An OpenAI server already running, as the front end (not started, not stopped)."""

    def __init__(self, url: str):
        self.url, self.proc = url.rstrip("/"), None

    def stop(self):
        pass


EXTERNAL = FRONTEND.startswith("http://")


def start_frontend(tokenizer: str | None = TOKENIZER):
    """The front end under test in front of the gRPC engine; `tokenizer` None or "": no
    tokenizer flag (the front end asks the engine for it)."""
    if EXTERNAL:
        return External(FRONTEND)
    tok = ["--model-path", tokenizer] if tokenizer else []
    if FRONTEND == "smg":
        return Smg(smg_exe(), [GRPC_URL], *tok, *FRONTEND_ARGS)
    return Router([GRPC_URL], *tok, *FRONTEND_ARGS)
