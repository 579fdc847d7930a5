"""Training configuration: one dataclass, presets as data, config files (YAML or JSON) and
``key=value`` overrides from the command line.

Precedence: the dataclass defaults, then the preset, then the file, then the overrides. A file may
name a preset itself (``preset: small``). Nested model fields are addressed as ``model.hidden_size``.
A step that changes ``model_type`` starts ``model`` afresh from that family's tiny shape (``TINY_MODELS``),
whatever the order of the overrides: ``model`` holds the arguments of one family's config class.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from ..ops.checks import check_choice, check_int, check_positive
from .families import MODEL_TYPES


DEVICES = ("auto", "cpu", "cuda")  # "cuda": this process's GPU, cuda:LOCAL_RANK
# The `model` a family starts from (the `tiny` preset's width and depth); fla's start from their config
# classes' defaults (1.3B-class models), so give their shape.
TINY_MODELS = {
    "ramnet": dict(hidden_size=128, num_hidden_layers=4, num_heads=4, head_v_dim=32, num_partitions=3,
                   partition_dim=4, topk=4, intermediate_size=352),
    "transformer++": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=352),
}


@dataclass
class TrainConfig:
    """The defaults are the `tiny` preset: a CPU run on the built-in corpus."""

    # Where checkpoints, logs and TensorBoard events go.
    out_dir: str = "runs/tiny"
    # A directory written by `ramnet data prepare`. When it does not exist yet and `prepare` is set,
    # rank 0 prepares it first (so that a preset runs from nothing). Unset: where `ramnet data prepare`
    # writes with the settings of `prepare` (`data.default_data_dir`: data/python-docs-bpe4k here).
    data: str | None = None
    prepare: dict | None = field(default_factory=lambda: dict(source="python-docs", tokenizer="bpe", vocab_size=4096))
    # The model family (see ramnet/lm/families.py): "ramnet", "transformer++" (Hugging Face's Llama) or,
    # with flash-linear-attention on a GPU, "fla.gated_deltanet", "fla.gla", "fla.mamba2", "fla.hgrn2", "fla.raven".
    model_type: str = "ramnet"
    # Keyword arguments of the family's config class (RAMNetConfig, LlamaConfig, fla's GatedDeltaNetConfig,
    # ...); vocab_size and the special token ids come from the data's tokenizer.
    model: dict = field(default_factory=lambda: dict(TINY_MODELS["ramnet"]))

    seq_len: int = 256
    batch_size: int = 8  # sequences per optimizer step, over all processes and accumulation steps
    # Sequences per forward pass on one process. Unset: batch_size / processes (no accumulation), so that
    # a config runs unchanged on one process or under torchrun.
    micro_batch_size: int | None = None
    max_steps: int = 400
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 40
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    # The lr of RAM-Net's per-head address temperatures (e^alpha, `q_log_scale`/`k_log_scale`) as a
    # multiple of `lr`: at lr 1e-3 alpha moves by at most about 1e-3 a step, while sharp addresses
    # need e^alpha of several.
    temperature_lr_scale: float = 1.0
    seed: int = 0

    eval_interval: int = 100  # steps between held-out evaluations (0: only at the end)
    eval_batches: int = 8  # held-out batches of `batch_size` sequences per evaluation
    save_interval: int = 200  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2
    log_interval: int = 10

    device: str = "auto"  # "auto" (cuda:LOCAL_RANK when there is a GPU), "cpu", "cuda"
    precision: str = "auto"  # "auto" (bf16 autocast on GPU, fp32 on CPU), "bf16", "fp32"
    parallel: str = "ddp"  # with several processes: "ddp" or "fsdp" (FSDP2, `fully_shard`)
    gradient_checkpointing: bool = False
    # "auto": continue from the newest checkpoint in out_dir if there is one; "none": start afresh
    # (fails if out_dir has checkpoints); or a checkpoint directory.
    resume: str = "auto"
    # Where metrics go besides out_dir/metrics.jsonl: "tensorboard" (pip install 'ramnet[tensorboard]')
    # and/or "wandb" (pip install wandb), e.g. report_to=[tensorboard,wandb]. None by default, as in
    # transformers' TrainingArguments.
    report_to: list[str] = field(default_factory=list)
    wandb_project: str = "ramnet"

    def __post_init__(self):
        # YAML 1.1 reads "1e-3" as a string (it wants "1.0e-3"), so the float fields accept number strings.
        for name in ("lr", "min_lr", "weight_decay", "adam_eps", "grad_clip", "temperature_lr_scale"):
            setattr(self, name, _as_float(name, getattr(self, name)))
        self.betas = tuple(_as_float("betas", b) for b in self.betas)
        self.report_to = list(self.report_to)
        for name in ("seq_len", "batch_size", "max_steps", "eval_batches", "keep_checkpoints", "log_interval"):
            setattr(self, name, check_int(f"`{name}`", getattr(self, name), 1))
        if self.micro_batch_size is not None:
            self.micro_batch_size = check_int("`micro_batch_size`", self.micro_batch_size, 1)
        for name in ("warmup_steps", "eval_interval", "save_interval"):
            setattr(self, name, check_int(f"`{name}`", getattr(self, name), 0))
        check_positive("`min_lr`", self.min_lr, allow_zero=True, upper=self.lr)
        check_positive("`temperature_lr_scale`", self.temperature_lr_scale)
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise ValueError(f"`batch_size` ({self.batch_size}) must be a multiple of `micro_batch_size` ({self.micro_batch_size})")
        choices = {"precision": ("auto", "bf16", "fp32"), "parallel": ("ddp", "fsdp"), "model_type": MODEL_TYPES,
                   "device": DEVICES}
        for name, allowed in choices.items():
            check_choice(f"`{name}`", getattr(self, name), allowed)
        if self.prepare is not None and not isinstance(self.prepare, dict):
            raise ValueError(f"`prepare` must be a mapping of `ramnet data prepare` settings or null, got {self.prepare!r}")
        if self.data is None:
            if self.prepare is None:
                raise ValueError("`data` is not set and there are no `prepare` settings to name it: set data=DIR "
                                 "(a directory written by `ramnet data prepare`)")
            from .data import default_data_dir

            self.data = default_data_dir(**self.prepare)
        if not isinstance(self.data, str):
            raise ValueError(f"`data` must be a directory name, got {self.data!r}")
        if not isinstance(self.model, dict):
            raise ValueError(f"`model` must be a mapping of config arguments, got {self.model!r}")
        unknown = set(self.report_to) - {"tensorboard", "wandb"}
        if unknown:
            raise ValueError(f"`report_to` entries must be 'tensorboard' or 'wandb', got {sorted(unknown)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _as_float(name: str, value) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a number, got {value!r}") from None


# The data, batch and schedule of `small`, shared by its baselines.
_SMALL_RUN = dict(
    prepare=dict(source="fineweb-edu", tokenizer="hf-internal-testing/llama-tokenizer", max_tokens=700_000_000),
    seq_len=2048, batch_size=32, micro_batch_size=16, max_steps=10_000, lr=1e-3, min_lr=1e-4,
    warmup_steps=500, eval_interval=500, eval_batches=16, save_interval=1000,
)

PRESETS: dict[str, dict[str, Any]] = {
    # CPU, a few minutes: the TrainConfig defaults. 1.8M parameters (1.2M without the input embedding),
    # a 4096-token BPE trained on the built-in offline corpus (python-docs, ~0.5M tokens), 400 steps
    # of 8 x 256 tokens.
    "tiny": {},
    # One GPU: 8 layers of width 512, 39M parameters without the input embedding (38,958,208, the LM
    # head included; 55M in all), on FineWeb-Edu with the Llama-2 tokenizer (the paper's vocabulary; this
    # ungated copy loads without a hub login). 64k tokens a step, 10k steps: 655M tokens, about 17 per parameter.
    # The mixer is RAM-Net with what the LM study's ablation favoured (benchmarks/results/lm/README.md):
    # the gated output norm (22.20 against 24.41 held-out perplexity at 32.8M tokens; its g_proj, 512 x 512
    # a layer, is paid by the MLP, 1408 -> 1237), the temperatures' lr x 30 (23.67 against 24.41), CAPE on
    # the paper's absolute layers, all heads of layers 1-4 and half of 5-8 (22.57 against 23.73 with CAPE
    # off, on the study's earlier corpus), and a short convolution of 4 on q, k and v (batch 6: 8-12% lower
    # perplexity than without it at every evaluation from 16M to 29M tokens; 3,072 parameters a layer).
    "small": dict(
        _SMALL_RUN, out_dir="runs/small", temperature_lr_scale=30.0,
        model=dict(hidden_size=512, num_hidden_layers=8, num_heads=8, head_v_dim=64, num_partitions=4,
                   partition_dim=4, topk=8, intermediate_size=1237, output_gate=True,
                   num_cape_heads=[8, 8, 8, 8, 4, 4, 4, 4], short_conv_size=4),
    ),
    # `small` with the paper's mixer as the paper describes it: no output gate (the MLP 1408 wide: 38,937,216
    # parameters), the temperatures at the common lr, CAPE on the paper's absolute layers.
    "small-paper": dict(
        _SMALL_RUN, out_dir="runs/small-paper",
        model=dict(hidden_size=512, num_hidden_layers=8, num_heads=8, head_v_dim=64, num_partitions=4,
                   partition_dim=4, topk=8, intermediate_size=1408, num_cape_heads=[8, 8, 8, 8, 4, 4, 4, 4]),
    ),
    # The baselines of `small` at the same data, tokens and schedule, and the same width and SwiGLU;
    # depth sets the parameter count, as in the paper's Table 2 (Transformer++ 24 and GDN 21 layers
    # against RAM-Net's 27). Transformer++: a layer has 4 x 512^2 (attention, 8 heads of 64) + 3 x 512 x 1408
    # (MLP) + 2 x 512 (norms) = 3,212,288 parameters; 7 layers: 38,870,528 in all (0.998 x small; a test).
    "small-transformer": dict(
        _SMALL_RUN, out_dir="runs/small-transformer", model_type="transformer++",
        model=dict(hidden_size=512, num_hidden_layers=7, num_attention_heads=8, intermediate_size=1408),
    ),
    # Gated DeltaNet in the paper's proportions (3 heads, key dim 0.75 x width, value dim twice the key
    # dim, short convolutions of 4), at width 512: head_dim 128, key dim Dk = 384, value dim Dv = 768.
    # A layer (fla's GatedDeltaNet and GatedDeltaNetBlock, no biases): q, k 2 x 512 x 384 = 393,216;
    # v, g 2 x 512 x 768 = 786,432; o 768 x 512 = 393,216; a, b 2 x 512 x 3 = 3,072; A_log, dt_bias 6;
    # depthwise convs 4 x (384 + 384 + 768) = 6,144; gated output norm 256; MLP 3 x 512 x 1408 = 2,162,688;
    # block norms 1,024: 3,746,054. 6 layers: 38,860,836 in all (0.998 x small; estimated, fla needs a
    # GPU; tests/lm/test_lm_baselines.py checks the formula, and the real count where fla is installed:
    # fla 0.6.0 builds it on CPU, to the same count).
    "small-gated-deltanet": dict(
        _SMALL_RUN, out_dir="runs/small-gated-deltanet", model_type="fla.gated_deltanet",
        model=dict(hidden_size=512, num_hidden_layers=6, num_heads=3, head_dim=128, expand_v=2, conv_size=4,
                   intermediate_size=1408),
    ),
    # fla's GLA (GatedLinearAttention in GLABlock) with fla's defaults: key dim 0.5 x width, value dim the
    # width, no short convolutions, a swish output gate through the per-head output norm, and a low-rank
    # (16) forget gate; 4 heads at width 512: key dim 256, value dim 512 (heads of 64 x 128). A layer (no
    # biases but the gate's): q, k 2 x 512 x 256 = 262,144; v, g 2 x 512 x 512 = 524,288; o 512 x 512 = 262,144;
    # forget gate 512 x 16 + 16 x 256 + 256 = 12,544; gated output norm 128; MLP 3 x 512 x 1408 = 2,162,688;
    # block norms 1,024: 3,224,960. 7 layers: 38,959,232 in all (1.0006 x small; 6 layers: 0.918 x). A test
    # checks the formula, and fla's own count where fla is installed (fla 0.6.0 builds it on CPU: equal).
    # The model of the study's earlier ad-hoc `gla` variant (`small` with model_type=fla.gla, 7 layers, 4 heads).
    "small-gla": dict(
        _SMALL_RUN, out_dir="runs/small-gla", model_type="fla.gla",
        model=dict(hidden_size=512, num_hidden_layers=7, num_heads=4, expand_k=0.5, expand_v=1,
                   intermediate_size=1408),
    ),
    # fla's Raven (Raven in RavenBlock; fla 0.6.0): per head, num_slots key and value slots that a linear
    # sigmoid router writes top-k at a time (Gumbel noise in training), Mamba2 decay, QK RMSNorm, no
    # short convolution, no output gate. The authors' published shape (their ~400M model, 24 x 1024: 4 heads,
    # 256 slots, top-k 32; fla's config defaults to 64 slots) at width 512: heads of 128 (expand_k = expand_v
    # = 1); 256 slots are also `small`'s memory rows (M = 4^4, top-k 8). A layer (no biases): q, k, v,
    # o 4 x 512^2 = 1,048,576; router 512 x 4 x 256 = 524,288; decay a 512 x 4 = 2,048, A_log and dt_bias 8;
    # q, k norms 2 x 128 = 256; output norm 512; MLP 3 x 512 x 1424 = 2,187,264; block norms 1,024: 3,763,976.
    # Depth alone misses by more than 0.2% (with the MLP at 1408, 6 layers are 38,820,912, 0.9970 x small;
    # 7 are 1.093 x), so the MLP is 1424 wide (1421 would match best; 1424 keeps a multiple of 16 for the
    # matmuls): 6 layers, 38,968,368 in all (1.0008 x small). A test checks the formula, and fla's own count
    # where fla is installed (fla 0.6.0 builds it on CPU: equal).
    "small-raven": dict(
        _SMALL_RUN, out_dir="runs/small-raven", model_type="fla.raven",
        model=dict(hidden_size=512, num_hidden_layers=6, num_heads=4, num_slots=256, topk=32,
                   intermediate_size=1424),
    ),
    # The hybrid's LM comparison: every layer the synchronous hybrid (RAM-Net + sliding-window attention
    # over 64 tokens on shared projections, per-channel gate). The gate (512 x 512 + bias) and the
    # per-head output norm add 262,720 parameters a layer, so the MLP is 1236 wide instead of 1408:
    # 38,925,440 in all (0.9997 x small; a test).
    "small-hybrid": dict(
        _SMALL_RUN, out_dir="runs/small-hybrid",
        model=dict(hidden_size=512, num_hidden_layers=8, num_heads=8, head_v_dim=64, num_partitions=4,
                   partition_dim=4, topk=8, intermediate_size=1236, mixer_types=["hybrid"] * 8, window_size=64,
                   hybrid_blend="synchronous", hybrid_mix="vector"),
    ),
    # The hybrid's sliding-window baseline: every layer softmax attention over the last 64 tokens
    # (the hybrid's KV branch alone, with its own q, k, v, o: 4 x 512^2 a layer), the MLP 1152 wide
    # to keep the parameters of `small`: 38,937,088 in all (a test).
    "small-sliding": dict(
        _SMALL_RUN, out_dir="runs/small-sliding",
        model=dict(hidden_size=512, num_hidden_layers=8, num_heads=8, head_v_dim=64, intermediate_size=1152,
                   mixer_types=["sliding_attention"] * 8, window_size=64),
    ),
    # The paper's recipe: 340M, FineWeb-Edu 10B tokens, context 4096, 0.5M-token
    # batches (128 sequences: 8 GPUs x 4 sequences x 4 accumulation steps), 500M-token warm-up
    # (954 steps), 19073 steps, AdamW 1e-3 -> 1e-4, wd 0.1, clip 1.0. The model is the paper's
    # (RAMNetConfig's defaults, CAPE schedule included). Launch with `torchrun --nproc_per_node 8 -m ramnet.cli train --preset paper-340m`.
    "paper-340m": dict(
        out_dir="runs/paper-340m",
        prepare=dict(source="fineweb-edu", tokenizer="hf-internal-testing/llama-tokenizer", max_tokens=10_000_000_000),
        model=dict(hidden_size=1024, num_hidden_layers=27, num_heads=16, head_v_dim=64, num_partitions=5,
                   partition_dim=4, topk=8, intermediate_size=2816),
        seq_len=4096, batch_size=128, micro_batch_size=4, max_steps=19_073, lr=1e-3, min_lr=1e-4,
        warmup_steps=954, eval_interval=1000, eval_batches=4, save_interval=500, parallel="fsdp",
    ),
}


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value). The value is read as JSON when it is JSON (numbers such as
    1e-3, true, null, lists), else as YAML would read it without PyYAML: True/False/yes/no/on/off and
    null/~ (any case) as booleans and None, anything else as a string (a path stays a string), and
    ``[a, b]`` as a list of such values."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ValueError(f"override {item!r} must look like key=value (e.g. lr=1e-3 or model.hidden_size=256)")
    return key.split("."), _value(text)


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):  # [a, b]: JSON would want ["a", "b"]
        inner = text[1:-1].strip()
        return [_value(part) for part in inner.split(",")] if inner else []
    return _YAML_WORDS.get(text.lower(), text)


# The words that YAML (1.1, PyYAML's) reads as booleans and null, which overrides were once read as.
_YAML_WORDS = {**dict.fromkeys(("true", "yes", "on"), True), **dict.fromkeys(("false", "no", "off"), False),
               "null": None, "~": None}


def _apply(values: dict, layer: dict) -> dict:
    """`layer` (a preset, file or override) over `values`; a new `model_type` starts `model` afresh."""
    if layer.get("model_type", values["model_type"]) != values["model_type"]:
        values = dict(values, model=copy.deepcopy(TINY_MODELS.get(layer["model_type"], {})))
    return _merge(values, layer)


def _merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        # `prepare` is replaced whole: a BPE's vocab_size has no meaning next to another tokenizer.
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "prepare":
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _yaml():
    """PyYAML, which only YAML config files need."""
    try:
        import yaml
    except ImportError:
        raise ValueError("--config: a YAML config file needs PyYAML: pip install 'ramnet[yaml]' "
                         "(or write the file as JSON, FILE.json)") from None
    return yaml


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ValueError(f"--config: cannot read {path}: {err}") from err
    reader = json if path.suffix == ".json" else _yaml()
    try:
        data = json.loads(text) if reader is json else reader.safe_load(text)
    except (json.JSONDecodeError, getattr(reader, "YAMLError", json.JSONDecodeError)) as err:
        raise ValueError(f"--config: cannot parse {path}: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"--config: {path} must hold a mapping of config keys")
    return data


def load_config(preset: str | None = None, file: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    # `model` is merged key by key; `data` stays unset unless a layer sets it, so that TrainConfig names
    # it after the final `prepare`.
    values = dict(TrainConfig().to_dict(), data=None)
    from_file = read_config_file(file) if file else {}
    preset = preset or from_file.pop("preset", None)
    from_file.pop("preset", None)
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {preset!r}")
        values = _apply(values, PRESETS[preset])
    values = _apply(values, from_file)
    parsed = [(item, *parse_override(item)) for item in overrides]
    # model_type first: it may start `model` afresh, which must not drop the model.* overrides.
    for item, keys, value in sorted(parsed, key=lambda p: p[1] != ["model_type"]):
        if keys == ["model_type"]:
            values = _apply(values, {"model_type": value})
            continue
        node = values
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {key} is not a mapping")
        node[keys[-1]] = value
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; known keys: {sorted(known)}")
    return TrainConfig(**values)
