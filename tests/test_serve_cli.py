"""`phi3fast serve` argument errors: one `error: ...` line and exit status 2, before anything listens."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from model_helpers import make_tiny

from phi3fast.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    return make_tiny(tmp_path_factory)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--adapter", "noequals"], "--adapter 'noequals': expected NAME=DIR"),
        (["--index", "=dir"], "--index '=dir': expected NAME=DIR"),
        (["--adapter", "a=x", "--adapter", "a=y"], "--adapter a: given twice"),
        (["--adapter", "a=/nonexistent/adapter"], "adapter_config.json: missing"),
        (["--adapter", "tiny=/nonexistent"], "is the base model's name"),
        (["--index", "docs=/nonexistent/index"], "/nonexistent/index"),
        (["--max-context", "100000"], "--max-context must be from 2 to"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tiny, extra: list[str], message: str) -> None:
    r = CliRunner().invoke(main, ["serve", "--model", str(tiny), "--port", "0", *extra])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.output
