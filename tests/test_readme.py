"""The README's two commands are what CI and users run."""

from __future__ import annotations

import re
import subprocess

from conftest import REPO


def command_after(marker: str) -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(rf"<!-- {marker} -->\n```bash\n(.+?)\n```", text)
    assert m, marker
    return m.group(1)


def test_main_command_installs_and_runs_the_used_by_sweep():
    cmd = command_after("main-command")
    assert "pip install -e ." in cmd
    assert cmd.endswith("python sweep.py -m seq=512,2048,8192 dtype=fp16,bf16")


def test_ci_runs_the_readme_test_command():
    cmd = command_after("test-command")
    assert "pip install" in cmd and "pytest" in cmd
    awk = subprocess.run(
        ["bash", "-c", "sed -n 's/^cmd=\\$(\\(.*\\))$/\\1/p' .ci/run | bash"],
        cwd=REPO, capture_output=True, text=True, check=True)
    assert awk.stdout.strip() == cmd
