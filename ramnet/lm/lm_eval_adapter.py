"""lm-evaluation-harness adapter: registers the model name `ramnet`.

`import ramnet` already registers RAM-Net with transformers' Auto classes, so lm-eval's `HFLM` loads a
checkpoint directory as it is; what a separate process needs is that import. lm-eval finds models only
in its own registry (it has no plugin entry points), so its `lm_eval` command cannot see this one:
`ramnet eval harness ARGS` (= `python -m ramnet.lm.lm_eval_adapter ARGS`) imports this module and then
runs lm-eval's command line with ARGS, e.g. `--model ramnet --model_args pretrained=DIR --tasks ...`.
From Python, import this module and call `lm_eval.simple_evaluate(model="ramnet", ...)`.
"""

from __future__ import annotations

import sys

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from .. import models  # noqa: F401  (registers RAM-Net with the Auto classes)
from .families import register_checkpoint


@register_model("ramnet")
class RAMNetLM(HFLM):
    """`HFLM` for the checkpoints of `ramnet train`, of any family (`pretrained=DIR`, any other HFLM
    argument as usual)."""

    def __init__(self, pretrained, **kwargs):
        if isinstance(pretrained, str):
            register_checkpoint(pretrained)  # fla's models, if it is one
        kwargs.setdefault("backend", "causal")
        super().__init__(pretrained=pretrained, **kwargs)

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        # Scoring needs only the logits: use_cache=False spares building the final recurrent state,
        # M * d_v floats per head, layer and sequence (HFLM's own call leaves it to the model's default).
        autocast = torch.autocast(self.device.type, dtype=self.mixed_precision_dtype, enabled=self.mixed_precision_dtype is not None)
        with torch.no_grad(), autocast:
            return self.model(inps, use_cache=False).logits


def run_cli(argv: list[str]) -> None:
    """lm-eval's command line with `ramnet` registered."""
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    run_cli(sys.argv[1:])
