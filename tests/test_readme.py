"""The README's Python snippets run as written; the one for a server runs against a live MiniLM server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_python_snippets() -> None:
    assert len(SNIPPETS) >= 3


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_snippet_runs_as_written(index: int, tmp_path: Path) -> None:
    code = SNIPPETS[index]
    compile(code, f"README snippet {index}", "exec")
    if "http://127.0.0.1:8470" in code:
        _run_against_a_server(code, tmp_path)
        return
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"README snippet {index} failed:\n{code}\n{done.stderr[-3000:]}"


def _run_against_a_server(code: str, tmp_path: Path) -> None:
    """The README's ``graytune serve minilm --access dark-gray`` on port 8470 (another free port if taken)."""
    import graytune
    from graytune.errors import RemoteError
    from graytune.serve import ApiKeys, ServeConfig, create_app
    from graytune.serve.runner import BackgroundServer

    key = "readme-key-0123456789abcdef"
    jobs = "fine_tuning" in code  # the fine-tuning jobs snippet: graytune serve minilm ... --jobs DIR
    extra = None
    if jobs:
        from graytune.recipes.jobs.routes import install_jobs as extra
    config = ServeConfig(access="dark-gray", jobs=str(tmp_path / "jobs") if jobs else "")
    app = create_app(graytune.open_backbone("minilm", "dark-gray"), config, ApiKeys({"alice": key}), extra=extra)
    try:
        server = BackgroundServer(app, port=8470)
        url = server.start()
    except RemoteError:  # port 8470 is taken on this machine: the same server on a free port
        server = BackgroundServer(app)
        url = server.start()
    try:
        done = subprocess.run([sys.executable, "-c", code.replace("http://127.0.0.1:8470", url)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=600,
                              env={**os.environ, "GRAYTUNE_API_KEY": key})
    finally:
        server.stop()
    assert done.returncode == 0, f"README server snippet failed:\n{code}\n{done.stderr[-3000:]}"
