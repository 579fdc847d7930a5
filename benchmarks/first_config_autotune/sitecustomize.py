"""Cut Triton's autotuning to the first config that compiles and runs, in every Python process
started with this folder on ``PYTHONPATH`` (spawned workers included, which is why this is a
``sitecustomize`` and not a wrapper script):

    PYTHONPATH=benchmarks/first_config_autotune python -m ramnet mqar --models delta_net ...

Why: on a fresh machine fla's kernels spend minutes compiling every config of every autotuned
kernel before the first step (280-300 s for GLA on the H200, more for DeltaNet), which is most of
a short MQAR run. Which config runs changes the speed, not the result (the configs compute the
same thing in different tiles), so accuracy benchmarks may skip the search; timing benchmarks must
not use this.
"""

import importlib.machinery
import importlib.util
import os
import sys


def _patch_autotuner():
    try:
        from triton.runtime.autotuner import Autotuner
    except ImportError:  # no Triton here: nothing to cut
        return
    bench, run = Autotuner._bench, Autotuner.run

    def first_config_bench(self, *args, config, **meta):
        # Configs after the first one that ran are not compiled: infinite time, never chosen.
        if getattr(self, "_first_config_found", False):
            return [float("inf")] * 3
        timings = bench(self, *args, config=config, **meta)
        self._first_config_found = timings[0] != float("inf")
        return timings

    def first_config_run(self, *args, **kwargs):
        self._first_config_found = False  # a new key autotunes afresh
        return run(self, *args, **kwargs)

    Autotuner._bench, Autotuner.run = first_config_bench, first_config_run


def _chain_next_sitecustomize():
    """Run the sitecustomize this one shadows, if the environment has one."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


_patch_autotuner()
_chain_next_sitecustomize()
