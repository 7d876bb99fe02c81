"""The README's and the docs' examples run as written.

Every ```python block of a page runs, in order, as one script (later blocks use what earlier ones
defined, as a reader would). A ```bash block runs when the line before it says
``<!-- docs-test: run -->``; with ``ray-cluster`` added, it runs in a network namespace of its own
with only the loopback interface, so that the Ray cluster it starts can listen nowhere else. Each
runs in a scratch folder with the repository's ``examples/`` beside it, on the CPU.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"(?:<!-- docs-test: (?P<tags>[^>]*?) -->\n)?```(?P<lang>\w*)\n(?P<code>.*?)\n```", re.DOTALL)
# Set in this process by an earlier test's search: lrfuse.lightning.search.cluster (the token, the
# local-only switch) and Ray's local start (RAY_AUTH_MODE=token).
_SET_BY_SEARCH = ("RAY_AUTH_TOKEN", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE")
LIMIT_S = 900  # a safety net: the README's examples take about a minute each on a loaded 2-core machine


def blocks(page: Path) -> list[tuple[str, set[str], str]]:
    """(language, tags, code) of every fenced block of ``page``, in order."""
    return [(m["lang"], {t.strip() for t in (m["tags"] or "").split(",") if t.strip()}, m["code"])
            for m in FENCE.finditer(page.read_text())]


def _pages_with_python() -> list[Path]:
    return [p for p in PAGES if any(lang == "python" for lang, _, _ in blocks(p))]


def _bash_blocks() -> list[tuple[str, set[str], str]]:
    return [(f"{page.name}:{i}", tags, code) for page in PAGES
            for i, (lang, tags, code) in enumerate(blocks(page)) if lang == "bash" and "run" in tags]


def _run(cmd: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    # The venv's scripts (lrfuse, ray) first on PATH, as after `. .venv/bin/activate`; without what
    # an earlier test's search set in this process's environment, which a reader's shell lacks:
    # Ray's token, and the local-only switch (with it, `ray start --address` refuses a second node).
    environ = {k: v for k, v in os.environ.items() if k not in _SET_BY_SEARCH}
    environ.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", PYTHONUNBUFFERED="1", **env)
    return subprocess.run(cmd, cwd=cwd, env=environ, capture_output=True, text=True, timeout=LIMIT_S)


def _scratch(tmp_path: Path) -> Path:
    (tmp_path / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
    return tmp_path


def test_every_page_is_checked():
    # The collector finds what it is meant to: the README's Python examples and its marked commands.
    assert ROOT / "README.md" in _pages_with_python()
    assert {"run"} <= next(tags for name, tags, _ in _bash_blocks() if name.startswith("README.md"))
    assert any("ray-cluster" in tags for _, tags, _ in _bash_blocks())


@pytest.mark.parametrize("page", _pages_with_python(), ids=lambda p: p.name)
def test_python_examples_run(page, tmp_path):
    script = "\n\n".join(code for lang, _, code in blocks(page) if lang == "python")
    (tmp_path / "example.py").write_text(script)
    done = _run([sys.executable, "example.py"], _scratch(tmp_path))
    assert done.returncode == 0, f"{page.name}'s Python examples failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


@pytest.mark.parametrize("name,tags,code", _bash_blocks(), ids=[name for name, _, _ in _bash_blocks()])
def test_marked_commands_run(name, tags, code, tmp_path):
    cwd = _scratch(tmp_path)
    (cwd / "commands.sh").write_text(code + "\n")
    if "ray-cluster" not in tags:
        done = _run(["bash", "-euo", "pipefail", "commands.sh"], cwd)
        assert done.returncode == 0, f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
        return
    if shutil.which("unshare") is None or shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("the cluster recipe runs in a loopback-only network namespace: needs root, unshare and ip")
    # Ray's session folders in a short folder of our own (socket paths must fit in 107 bytes), so
    # that whatever the recipe started can be found by it and stopped, also when it fails half-way.
    ray_tmp = tempfile.mkdtemp(prefix="lrfuse-ray-", dir="/tmp")
    try:
        done = _run(["unshare", "--net", "bash", "-c", "ip link set lo up && bash -euo pipefail commands.sh"], cwd,
                    RAY_TMPDIR=ray_tmp, RAY_AUTH_MODE="disabled")
        assert done.returncode == 0, f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
        # The trials imported the user's module on nodes that only Ray's runtime env gave it to.
        assert "train with: lrfuse fit" in done.stdout, done.stdout[-3000:]
        assert (cwd / "ray_results").is_dir()
    finally:
        _stop_processes_naming(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _stop_processes_naming(folder: str) -> None:
    """SIGKILL every process whose command line names ``folder`` (Ray's GCS, raylets, workers)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if folder in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(pid), signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue


def _commands(text: str) -> list[list[str]]:
    """Shell lines as argument lists, without comments, one command per `&&`-joined part."""
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        command: list[str] = []
        for token in shlex.split(line, comments=True) + ["&&"]:
            if token != "&&":
                command.append(token)
            elif command:
                out.append(command)
                command = []
    return out


def test_make_runs_the_readmes_install_commands():
    # The README's install block is what `make` runs to set up .venv (with the `test` extra there,
    # `lightning` in the README): `make -n` lists the commands without running them.
    (install,) = [code for lang, _, code in blocks(ROOT / "README.md")
                  if lang == "bash" and "--no-build-isolation" in code]
    readme = [c for c in _commands(install) if c[:1] != ["."]]  # `. .venv/bin/activate`
    done = subprocess.run(["make", "-n", "-B", ".venv/.built", "VENV=.venv", "EXTRAS=lightning"], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    made = []
    for c in _commands(done.stdout):
        if c[0] == "touch":
            continue
        while "=" in c[0]:  # the environment make sets for a command (MAX_JOBS, ...)
            c = c[1:]
        if c[:4] == [".venv/bin/python", "-m", "pip", "-q"]:
            c = ["pip", *c[4:]]
        made.append([Path(c[0]).name if c[0].startswith(".venv/bin/") else c[0], *c[1:]])
    assert made == readme


def test_benchmarks_gpu_commands_say_so_at_once_without_a_gpu():
    # The README's GPU benchmark commands run on the GPU machine (benchmarks/gpu_check.sh); here,
    # without a CUDA device, each must stop at once and say what to run instead.
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: benchmarks/gpu_check.sh runs these")
    lines = [c for lang, _, code in blocks(ROOT / "README.md") if lang == "bash" for c in _commands(code)
             if c[:2] == ["lrfuse", "bench"] and "cuda" in c]
    assert len(lines) == 2, lines
    for c in lines:
        done = _run(c, ROOT)
        assert done.returncode != 0 and "no CUDA device; run with --device cpu" in done.stderr, (c, done.stderr)
