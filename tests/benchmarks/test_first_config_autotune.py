"""benchmarks/first_config_autotune: with its folder on PYTHONPATH, an autotuned kernel runs the
first config that works and compiles no other; without it, every config is benchmarked."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

FOLDER = Path(__file__).resolve().parents[2] / "benchmarks" / "first_config_autotune"

# The interpreter has no GPU timer, so the benchmark is a stand-in that runs the kernel and
# reports later configs as faster: real autotuning would pick the last one.
SCRIPT = """
import os
os.environ["TRITON_INTERPRET"] = "1"
import torch, triton, triton.language as tl

@triton.autotune(configs=[triton.Config({"B": b}) for b in (8, 16, 32, 64)], key=["n"])
@triton.jit
def double(x, y, n, B: tl.constexpr):
    i = tl.program_id(0) * B + tl.arange(0, B)
    tl.store(y + i, tl.load(x + i, mask=i < n) * 2, mask=i < n)

ran, best = [], []
def bench(fn, quantiles):
    if len(ran) == 0 and FAIL_FIRST:
        ran.append("failed")
        return [float("inf")] * 3   # as the autotuner reports a config that does not compile
    fn()
    ran.append("ran")
    return [10.0 - len(ran)] * 3

double.do_bench = bench
for n in (100, 37):  # a new key autotunes again
    x = torch.arange(n, dtype=torch.float32)
    y = torch.empty(n)
    double[lambda m: (triton.cdiv(n, m["B"]),)](x, y, n)
    assert torch.equal(y, 2 * x)
    best.append(double.best_config.kwargs["B"])
print(*best, ran.count("ran"))
"""


def run(fail_first: bool, cut: bool) -> str:
    env = dict(os.environ)
    if cut:
        env["PYTHONPATH"] = os.pathsep.join([str(FOLDER), env.get("PYTHONPATH", "")])
    code = SCRIPT.replace("FAIL_FIRST", str(fail_first))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_first_working_config_is_the_only_one_run():
    assert run(fail_first=False, cut=True) == ["8", "8", "2"]  # one config per key
    assert run(fail_first=True, cut=True) == ["16", "8", "2"]  # the first that compiles


def test_without_the_folder_every_config_is_benchmarked():
    assert run(fail_first=False, cut=False) == ["64", "64", "8"]
