"""What a result was measured on: GPU, driver, library versions, llmkernels commit, date."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd: list) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=REPO_ROOT).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_commit() -> str:
    """The checkout's commit (with "-dirty" when files differ from it); LLMKERNELS_GIT_COMMIT overrides it, for
    copies of the repository made without .git (as on the GPU machine)."""
    env = os.environ.get("LLMKERNELS_GIT_COMMIT")
    if env:
        return env
    commit = _run(["git", "rev-parse", "HEAD"])
    if not commit:
        return "unknown (no git checkout; set LLMKERNELS_GIT_COMMIT)"
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    return commit + ("-dirty" if dirty else "")


def collect() -> dict:
    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "llmkernels_commit": git_commit(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as exc:  # not installed, or broken: say so
        env["triton"] = f"unavailable: {type(exc).__name__}: {exc}"
    try:
        import llmkernels

        env["llmkernels"] = llmkernels.__version__
    except Exception as exc:
        env["llmkernels"] = f"unavailable: {type(exc).__name__}: {exc}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update({
            "device": "cuda",
            "gpu": torch.cuda.get_device_name(0),
            "gpu_capability": "sm_%d%d" % torch.cuda.get_device_capability(0),
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "gpu_sms": props.multi_processor_count,
            "gpu_count": torch.cuda.device_count(),
        })
        smi = _run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"])
        env["driver"] = smi.splitlines()[0] if smi else "unknown (nvidia-smi not found)"
    else:
        env.update({"device": "cpu", "gpu": None, "driver": None})
    return env


def describe(env: dict) -> str:
    where = (f"{env['gpu']} ({env['gpu_capability']}, {env['gpu_sms']} SMs, {env['gpu_memory_gib']} GiB), "
             f"driver/max SM clock/power limit: {env['driver']}" if env["device"] == "cuda"
             else f"CPU only ({env['cpu']}, {env['cpu_count']} cores)")
    return (f"{where}\npython {env['python']}, torch {env['torch']} (CUDA {env['torch_cuda']}), triton "
            f"{env['triton']}, llmkernels {env['llmkernels']} at {env['llmkernels_commit']}, {env['date_utc']}")
