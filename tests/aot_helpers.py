"""Run the AOT compile report (`python -m phi3fast.kernels.report --json --match ...`) from a test.

It runs in a subprocess with TRITON_INTERPRET=0 (the test process has the interpreter on). Every returned row is
checked for what every kernel must meet: compiled, no spills, a plausible register count; the caller asserts what
is specific to its kernels (which rows exist, tensor cores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def compile_report(match: str, timeout: float = 900) -> list[dict]:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    cmd = [sys.executable, "-m", "phi3fast.kernels.report", "--json", "--match", match]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.stdout.strip(), proc.stderr[-3000:]
    rows = json.loads(proc.stdout)
    assert rows, f"no kernel config matches {match!r}"
    for r in rows:
        where = f"{r['kernel']} [{r['config']}] {r['arch']}"
        assert r["error"] == "", f"{where}: {r['error']}"
        assert r["spill_bytes"] == 0, f"{where} spills {r['spill_bytes']} bytes"
        assert 0 < r["regs"] <= 255 and r["shared_bytes"] >= 0, where
    assert proc.returncode == 0, proc.stderr[-3000:]
    return rows


def compile_asm(match: str, kind: str, arch: str = "sm_80", timeout: float = 900) -> list[dict]:
    """[{kernel, config, arch, <kind>: text}] from `python -m phi3fast.kernels.report --asm KIND`."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    cmd = [
        sys.executable,
        "-m",
        "phi3fast.kernels.report",
        "--asm",
        kind,
        "--arch",
        arch,
        "--json",
        "--match",
        match,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)
    assert rows, f"no kernel config matches {match!r}"
    return rows
