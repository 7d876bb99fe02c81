"""Times one optimizer step of lrfuse against torch.optim on the standard workloads.

    python benchmarks/bench_step.py                 # CPU, all workloads, results in benchmarks/results/
    python benchmarks/bench_step.py --device cuda --large-params 1e9
    python benchmarks/bench_step.py --quick         # smoke test, small sizes

The benchmark itself is lrfuse.benchmark (also `lrfuse bench`); this script only picks default
output paths under benchmarks/results/.
"""

import logging
import sys
from pathlib import Path

# torch.utils.benchmark imports torch.utils.cpp_extension, whose CUDA_HOME notice is noise here.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

from lrfuse.benchmark import main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    device = argv[argv.index("--device") + 1] if "--device" in argv else "cpu"
    stem = Path(__file__).parent / "results" / (f"bench_{device}" + ("_quick" if "--quick" in argv else ""))
    if "--json" not in argv:
        argv += ["--json", str(stem.with_suffix(".json"))]
    if "--plot" not in argv:
        argv += ["--plot", str(stem.with_suffix(".png"))]
    sys.exit(main(argv))
