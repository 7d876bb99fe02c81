"""How the CUDA kernels split a call into launches, blocks and threads, checked on the CPU.

csrc/cuda/launch_plan.h is plain C++: tests/launch_plan_main.cpp compiles it for the host, runs
the packing on element counts alone (no memory behind the fake addresses) and prints what each
block of each launch would update. Every element of every tensor must fall in exactly one block,
every launch must stay within the kernel-parameter limits, and exactly the tensors that no
single block owns must be left for the step launch. Then a block's thread loop runs on real
arrays, one thread after the other.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 65536  # kChunkSize in csrc/cuda/launch_plan.h


@dataclass
class Plan:
    max_tensors: int = 0
    max_blocks: int = 0
    launches: list[list[tuple[int, ...]]] = field(default_factory=list)  # each block's printed fields
    late: list[int] = field(default_factory=list)


class Driver:
    """tests/launch_plan_main.cpp, compiled."""

    def __init__(self, exe: Path) -> None:
        self.exe = exe

    def plan(self, depth: int, numels: list[int]) -> Plan:
        """The launches for tensors of these element counts, ``depth`` operands each."""
        out = subprocess.run([str(self.exe), "plan", str(depth)], input=" ".join(map(str, numels)),
                             capture_output=True, text=True, check=True).stdout
        plan = Plan()
        for line in out.splitlines():
            kind, *values = line.split()
            numbers = tuple(map(int, values))
            if kind == "limits":
                plan.max_tensors, plan.max_blocks = numbers
            elif kind == "launch":
                plan.launches.append([])
            elif kind == "block":
                plan.launches[-1].append(numbers)
            else:
                plan.late.append(numbers[0])
        return plan

    def threads(self) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.exe), "threads"], capture_output=True, text=True)


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Driver:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path_factory.mktemp("launch_plan") / "launch_plan_main"
    subprocess.run([cxx, "-std=c++17", "-O1", "-Wall", "-Werror", f"-I{ROOT / 'csrc'}",
                    str(ROOT / "tests" / "launch_plan_main.cpp"), "-o", str(exe)], check=True)
    return Driver(exe)


def check(plan: Plan, numels: list[int]) -> None:
    """Every element in exactly one block, every launch within its limits, the right late steps."""
    chunks = [-(-n // CHUNK) for n in numels]
    covered = Counter()
    for blocks in plan.launches:
        assert 0 < len(blocks) <= plan.max_blocks
        assert len({b[0] for b in blocks}) <= plan.max_tensors
        for tensor, offset, n, numel, group, owns_step, addresses_ok in blocks:
            assert addresses_ok, f"tensor {tensor}: another tensor's operand or step in its slot"
            assert (numel, group) == (numels[tensor], tensor % 7)
            assert offset % CHUNK == 0 and n == min(CHUNK, numel - offset) > 0
            assert owns_step == (chunks[tensor] == 1)
            covered[tensor, offset] += 1
    expected = {(i, c * CHUNK) for i, count in enumerate(chunks) for c in range(count)}
    assert set(covered) == expected
    assert max(covered.values(), default=1) == 1, "a chunk is updated twice"
    assert plan.late == [i for i, count in enumerate(chunks) if count != 1]


@pytest.mark.parametrize("depth", [3, 4, 5])
def test_every_kind_of_tensor_in_one_launch(driver, depth):
    numels = [0, 1, 8, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 0, 5]
    plan = driver.plan(depth, numels)
    check(plan, numels)
    assert len(plan.launches) == 1


@pytest.mark.parametrize("depth", [4, 5])
def test_more_tensors_and_chunks_than_one_launch_holds(driver, depth):
    """As tests/test_cuda.py's test of the same name: 1,200 small tensors, one of 1,100 chunks."""
    numels = [97 + i % 7 for i in range(1200)]
    numels.insert(620, 1100 * CHUNK + 5)
    plan = driver.plan(depth, numels)
    check(plan, numels)
    assert len(plan.launches) > 3


def test_launch_boundaries(driver):
    """Slots full exactly; blocks full exactly at a tensor's last chunk; a tensor whose chunks go
    on in the next launch."""
    limits = driver.plan(5, [])
    assert 300 < limits.max_tensors < limits.max_blocks == 1024  # hundreds of tensors per launch
    m = limits.max_tensors
    numels = [10] * m + [1024 * CHUNK, 3, 1024 * CHUNK, 2 * CHUNK, 1]
    plan = driver.plan(5, numels)
    check(plan, numels)
    assert [len(blocks) for blocks in plan.launches] == [m, 1024, 1024, 1 + 2 + 1]
    assert {b[0] for b in plan.launches[1]} == {m}              # one whole tensor
    assert {b[0] for b in plan.launches[2]} == {m + 1, m + 2}   # 3 and 1,023 chunks of the next
    assert [b[0] for b in plan.launches[3]] == [m + 2, m + 3, m + 3, m + 4]


def test_offsets_past_2_31_and_2_32_elements(driver):
    numels = [2**31 + 4099, 3, 2**33 + 1]
    plan = driver.plan(4, numels)
    check(plan, numels)
    blocks = [b for launch in plan.launches for b in launch]
    last_of = {b[0]: b for b in blocks}  # each tensor's blocks come in order
    assert last_of[0][1:3] == (2**31, 4099)
    assert last_of[2][1:3] == (2**33, 1)
    total = sum(-(-n // CHUNK) for n in numels)
    assert len(plan.launches) == -(-total // 1024)  # only the block limit binds: no launch wasted


def test_threads_of_a_block_update_each_element_once(driver):
    """Vector and element paths (aligned, misaligned, one operand misaligned), tails, 512 and 3
    threads, float and double: each element updated once, the gradient never stored."""
    out = driver.threads()
    assert out.returncode == 0, out.stdout
    assert out.stdout.splitlines() == ["checked 160"]
