"""Fixtures shared by the optimizer tests: where the fused step runs (``backend``)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from lrfuse import ops
from parity import ALGORITHMS, needs_cuda

# Importing Lightning makes inductor's cache folder (in the system temp dir unless told), and the
# tests' conftests import it before any fixture runs; inductor looks the folder up again while the
# process exits. So it is set here, once, in the project's own (git-ignored) pytest cache folder.
_CACHE = Path(__file__).resolve().parents[1] / ".pytest_cache"
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(_CACHE / "inductor"))


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """pytest's own tmp path in the project's pytest cache folder (unless ``--basetemp`` is given),
    not ``pytest-of-<user>`` in the system temp dir: a test run leaves nothing there. Before
    pytest's tmp-path plugin reads the option. pytest makes the basetemp folder but not its
    parent, which on a fresh clone nothing else has made yet (make's runs give
    ``--basetemp=.pytest_cache/tmp-ray``)."""
    if config.option.basetemp is None:
        config.option.basetemp = str(_CACHE / "tmp")
    Path(config.option.basetemp).resolve().parent.mkdir(parents=True, exist_ok=True)


def pytest_sessionstart(session):
    """With ``LRFUSE_REQUIRE_NATIVE=1`` (set by .ci/run) the run fails here unless lrfuse's compiled
    kernels serve the CPU: without them every test marked for the native backend would skip and
    the run would pass on the reference path alone."""
    if os.environ.get("LRFUSE_REQUIRE_NATIVE", "0") in ("", "0") or ops.backend("cpu") == "native":
        return
    why = (f"importing lrfuse._C failed: {type(ops._load_error).__name__}: {ops._load_error}" if ops._C is None
           else f"LRFUSE_BACKEND={os.environ.get('LRFUSE_BACKEND')!r} forces the reference path")
    pytest.exit(f"LRFUSE_REQUIRE_NATIVE=1, but the CPU backend is {ops.backend('cpu')!r}: {why}",
                returncode=pytest.ExitCode.USAGE_ERROR)


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """torch's thread count after each test is what it was before: a test that changes it (or
    calls code that does) must not leave the later tests on one thread, where the CPU kernels'
    parallel split never runs."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def _private_temp_dir(tmp_path_factory):
    """Every temporary file of the run goes under pytest's tmp path, not the system temp dir: this
    process's and its subprocesses' (TMPDIR) and Ray's session folders (RAY_TMPDIR); inductor's
    cache is set at the top of this file, pytest's own tmp path in :func:`pytest_configure`."""
    base = tmp_path_factory.getbasetemp()
    temp, ray, own = base / "tmp", base / "ray", None
    # Ray's socket paths (<RAY_TMPDIR>/ray/session_<date>_<time>_<us>_<pid>/sockets/<name>) must fit
    # in 107 bytes: under a long base path, a short folder of the system temp dir, removed at the end.
    if len(str(ray)) + 72 > 107:
        ray = own = Path(tempfile.mkdtemp(prefix="lrfuse-ray-"))
    temp.mkdir(exist_ok=True)
    ray.mkdir(exist_ok=True)
    patch = pytest.MonkeyPatch()
    patch.setenv("TMPDIR", str(temp))
    patch.setattr(tempfile, "tempdir", str(temp))
    patch.setenv("RAY_TMPDIR", str(ray))
    # Ray runs its workers niced (15): on a loaded machine (CI beside other jobs) every trial then
    # waits behind any other process and the search tests take several times as long. At the
    # driver's priority they share the cores fairly; the tests' own load (test_search's
    # _core_busy) takes the workers' niceness, whatever it is.
    patch.setenv("RAY_worker_niceness", "0")
    yield
    patch.undo()
    if own is not None:
        shutil.rmtree(own, ignore_errors=True)


@pytest.fixture(scope="session")
def cuda_emulator():
    """tests/cuda_emulator.cpp, compiled against the torch in use (~30 s, once).

    One build folder per torch version in the project's pytest cache: pytest-xdist's workers
    share it (torch's build lock makes one compile and the others wait and load), and a later
    run with unchanged sources loads the build instead of compiling again."""
    if not cpp_extension.is_ninja_available():
        pytest.skip("building the CUDA emulator needs ninja")
    root = Path(__file__).resolve().parents[1]
    build = _CACHE / f"cuda_emulator-torch{torch.__version__}"
    build.mkdir(parents=True, exist_ok=True)
    # With the backends' argument checks (csrc/checks.cpp), which the CUDA op runs first too.
    return cpp_extension.load(name="lrfuse_cuda_emulator",
                              sources=[str(root / "tests" / "cuda_emulator.cpp"), str(root / "csrc" / "checks.cpp")],
                              extra_include_paths=[str(root / "csrc")], extra_cflags=["-O2"],
                              build_directory=str(build))


def emulated_op(emulator, rule: ops.Rule):
    """``rule``'s op with the native op's arguments, run by the CUDA backend's code on the host."""
    n = len(rule.all_states)

    def op(params, grads, *rest):
        steps = rest[n] if rule.counts_steps else []
        group_of, hyper, grad_scale, found_inf, stats = (*rest[n + rule.counts_steps:], None, None, None)[:5]
        emulator.fused(rule.name, params, grads, list(rest[:n]), steps, group_of, hyper, grad_scale, found_inf, stats)

    return op


@pytest.fixture(params=["native", "reference", "emulated", pytest.param("cuda", marks=[pytest.mark.cuda, needs_cuda])])
def backend(request, monkeypatch) -> torch.device:
    """Where the fused step runs; the device to put tensors on.

    native: lrfuse's CPU kernels. reference: the pure-PyTorch path. emulated: the CUDA backend's
    own code, from tensor lists to launches (csrc/cuda/fused_call.h) and of each block
    (csrc/cuda/kernels.h), built for the host by tests/cuda_emulator.cpp and run on CPU tensors
    block after block. cuda: the GPU.
    """
    if request.param == "cuda":
        return torch.device("cuda", 0)
    if request.param == "native" and ops.backend("cpu") != "native":
        pytest.skip("lrfuse._C is not built")
    monkeypatch.setattr(ops, "_forced", "reference" if request.param == "reference" else None)
    if request.param == "emulated":
        emulator = request.getfixturevalue("cuda_emulator")
        for algorithm in ALGORITHMS.values():
            monkeypatch.setattr(algorithm.fused, "_op", staticmethod(emulated_op(emulator, ops.RULES[algorithm.rule])))
    return torch.device("cpu")
