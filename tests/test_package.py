"""The package, its CLI and its build: --version/--help, `python -m phi3fast`, the wheel layout."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest
from click.testing import CliRunner

import phi3fast
from phi3fast.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_version_matches_metadata() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"phi3fast, version {version('phi3fast')}"
    assert phi3fast.__version__ == version("phi3fast")


def test_help_lists_only_registered_verbs() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "info" in result.output


def test_python_dash_m() -> None:
    out = subprocess.run([sys.executable, "-m", "phi3fast", "--version"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("phi3fast, version")


def test_info_reports_simd() -> None:
    from phi3fast import _hnsw

    result = CliRunner().invoke(main, ["info"])
    assert result.exit_code == 0, result.output
    assert f"simd: {_hnsw.simd_level()}" in result.output


def test_unknown_verb_fails() -> None:
    result = CliRunner().invoke(main, ["no-such-verb"])
    assert result.exit_code != 0


def test_kernels_is_a_subpackage_not_a_top_level_module() -> None:
    import phi3fast.kernels

    assert Path(phi3fast.kernels.__file__).parent.name == "kernels"


@pytest.mark.slow
def test_wheel_contains_extension_and_kernels(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("phi3fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("phi3fast/_hnsw") and n.endswith(".so") for n in names)
    assert "phi3fast/kernels/__init__.py" in names
    assert "phi3fast/cli/__init__.py" in names
    assert not any(n.startswith("kernels/") for n in names), "kernels must not ship as a top-level module"


def test_no_top_level_kernels_module(tmp_path: Path) -> None:
    # bitsandbytes imports a PyPI package named `kernels`; ours must only be importable as phi3fast.kernels.
    code = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else '')"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert not out.stdout.strip().startswith(str(ROOT)), (
        f"top-level 'kernels' resolves to {out.stdout.strip()}"
    )
