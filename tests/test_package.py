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
    # Every verb the README documents is registered, and --help lists exactly the registered ones.
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    listed = [
        ln.split()[0] for ln in result.output.split("Commands:", 1)[1].splitlines() if ln.startswith("  ")
    ]
    assert sorted(listed) == sorted(main.commands), listed
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    documented = {v for v in main.commands if f"`phi3fast {v}" in readme}
    assert documented == set(main.commands), (
        f"not in the README's CLI table: {set(main.commands) - documented}"
    )
    assert {"info", "init-tiny", "train", "generate", "merge", "index", "query"} <= set(main.commands)


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
    # The chat page of `phi3fast serve` ships as static files inside the package (no build step).
    assert {f"phi3fast/serve/page/{f}" for f in ("index.html", "chat.js", "style.css")} <= set(names)
    assert not any(n.startswith("kernels/") for n in names), "kernels must not ship as a top-level module"


def test_no_top_level_kernels_module(tmp_path: Path) -> None:
    # transformers, PEFT and bitsandbytes import a PyPI package named `kernels`; ours is only phi3fast.kernels.
    # The venv may live inside the repo, so compare with the repo's own folder, not with "anything under ROOT".
    code = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else '')"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    origin = out.stdout.strip()
    assert not origin or Path(origin).resolve().parent != ROOT / "kernels", f"top-level 'kernels' is {origin}"


def test_repo_root_does_not_shadow_installed_kernels() -> None:
    # From the repo root ('' first on sys.path) Python finds kernels/ before site-packages; it must hand over.
    code = (
        "import transformers, peft, bitsandbytes, kernels, phi3fast.kernels as pk\n"
        "print(kernels.__file__); print(pk.__file__); print(callable(pk.rms_norm))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    installed, ours, has_api = out.stdout.strip().splitlines()[-3:]
    assert "site-packages" in installed and Path(installed).resolve().parent != ROOT / "kernels", installed
    assert Path(ours).resolve() == ROOT / "kernels" / "__init__.py"
    assert has_api == "True"


def test_repo_root_kernels_without_the_pypi_package() -> None:
    # No installed `kernels` anywhere: a clear ModuleNotFoundError, not our folder posing as it.
    code = (
        "import sys; sys.path[:] = [p for p in sys.path if 'site-packages' not in p]\n"
        "try:\n    import kernels\nexcept ModuleNotFoundError as e:\n    print('missing:', e.name)\n"
        "else:\n    print('found:', kernels.__file__)\n"
        "print('kernels' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["missing:", "kernels", "False"], out.stdout
