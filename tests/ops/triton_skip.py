"""Why the Triton kernels' tests cannot run here, in words that name the fix (or None when they can)."""

import torch

from ramnet.ops.triton_support import HAS_TRITON, interpreting, triton_runs_on

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def triton_skip_reason(device=DEVICE) -> str | None:
    if not HAS_TRITON:
        return "Triton is not installed (pip install 'ramnet[triton]'; on CPU its interpreter runs the kernels)"
    if torch.device(device).type == "cpu" and not interpreting():
        return ("Triton is installed, but on CPU the kernels run only under its interpreter, TRITON_INTERPRET=1 "
                "before triton is imported (tests/conftest.py sets it when there is no GPU)")
    if not triton_runs_on(device):
        return f"Triton kernels cannot run on {device}"
    return None


SKIP_REASON = triton_skip_reason()
needs_triton = __import__("pytest").mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")
