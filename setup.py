"""Builds lrfuse._C: the CPU kernels always, the CUDA kernels too when torch is a CUDA build and
nvcc is found (no GPU needed). LRFUSE_CUDA=0 leaves CUDA out; LRFUSE_CUDA=1 makes its absence an
error. Install with `pip install --no-build-isolation -e .` to compile against the torch in use."""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import setuptools
from setuptools import setup

# `pip install --no-build-isolation` does not enforce pyproject's build requirements: check them
# here, before anything is compiled, and say what to run.
if tuple(int(x) for x in re.findall(r"\d+", setuptools.__version__)[:2]) < (77, 0):
    sys.exit(f"lrfuse: setuptools {setuptools.__version__} cannot read this pyproject.toml (it needs 77 or "
             "newer); run `pip install -U 'setuptools>=77' wheel`, then the same install command again.")
try:
    import torch
except ImportError:
    torch = None
if torch is None or "pip-build-env" in torch.__file__:
    sys.exit("lrfuse: the extension must compile against the torch it will run with, which this build "
             "cannot see (pip's build isolation hides the installed packages). Install torch first "
             "(`pip install torch`), then run `pip install --no-build-isolation .` (add -e for a checkout "
             "you edit).")


def nvcc_toolkit() -> str | None:
    """The toolkit folder of the nvcc on PATH. That nvcc may be a wrapper script, from whose
    location torch would guess the wrong folder, so ask nvcc itself."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    dry = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True, check=False)
    found = re.search(r"^#\$ _HERE_=(.+)$", dry.stderr, re.MULTILINE)
    return str(Path(found.group(1)).parent) if found else None


WANT_CUDA = os.environ.get("LRFUSE_CUDA", "auto")
if WANT_CUDA != "0" and not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
    toolkit = nvcc_toolkit()
    if toolkit:
        os.environ["CUDA_HOME"] = toolkit  # read by torch.utils.cpp_extension at import

from torch.utils import cpp_extension  # noqa: E402  (after CUDA_HOME is set)

ROOT = Path(__file__).parent
with_cuda = WANT_CUDA != "0" and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
if WANT_CUDA == "1" and not with_cuda:
    raise RuntimeError(f"LRFUSE_CUDA=1 but torch {torch.__version__} is not a CUDA build or nvcc was not found")
if not with_cuda and WANT_CUDA == "auto" and torch.cuda.is_available():
    # A GPU is here but its kernels will not be: CUDA parameters would take the slow reference path.
    print("\n" + "!" * 100 + f"\nlrfuse: a GPU is visible but the CUDA kernels are NOT built (torch {torch.__version__}, "
          "nvcc not found).\nCUDA parameters will take the slow pure-PyTorch path. Put nvcc on PATH, or set "
          "LRFUSE_CUDA=1 to make this an error.\n" + "!" * 100 + "\n", file=sys.stderr)
if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
    # torch takes the architectures from the visible GPUs and fails when there is none: build for
    # Ampere and Hopper, with PTX that newer GPUs compile at load time.
    os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"

sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cpp"))
cxx_flags = [
    "-O3",
    # Python's build flags ask for debug info (-g): it doubles the C++ compile time and the .so's
    # size (29 MB to 6 MB without), and torch's own wheels ship without it. Debugging the kernels?
    # Drop this line.
    "-g0",
    "-fopenmp",          # at::parallel_for; links the libgomp torch already loaded
    "-fno-math-errno",   # lets sqrt vectorize; results unchanged
    "-ffp-contract=off",  # no FMA contraction: the same rounding on every instruction-set variant
    f"-DLRFUSE_WITH_CUDA={int(with_cuda)}",
]
extension = cpp_extension.CppExtension
extra = {"cxx": cxx_flags}
include_dirs = [str(ROOT / "csrc")]
if with_cuda:
    extension = cpp_extension.CUDAExtension
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", f"-DLRFUSE_WITH_CUDA=1"]
    # torch's headers include CUDA library headers (cusparse.h) that pip's nvidia packages ship
    # and a bare toolkit may lack.
    site = Path(sysconfig.get_paths()["purelib"])
    include_dirs += [str(p) for p in sorted(site.glob("nvidia/cu*/include"))]

setup(
    ext_modules=[
        extension(
            "lrfuse._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
