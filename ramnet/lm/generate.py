"""Streaming generation, for any family of `ramnet train`. The prompt is read in one parallel pass;
then each new token is one step. For RAM-Net that step reads and writes K slots per head of a
fixed-size state (`RAMNetCache`), so the memory and the time per token do not grow with the context,
unlike a Transformer's KV cache (fla's models keep a fixed-size state too)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from tokenizers.decoders import DecodeStream
from transformers import Cache, DynamicCache

from ..models import RAMNetCache, RAMNetConfig


def new_cache(model) -> Cache:
    """An empty cache of the kind `model` makes for itself: RAM-Net's `RAMNetCache`, fla's `Cache`, or
    transformers' `DynamicCache` (Transformer++)."""
    if model.config.model_type == RAMNetConfig.model_type:
        return RAMNetCache()
    if type(model).__module__.startswith("fla."):
        from fla.models.utils import Cache as FLACache

        return FLACache()
    return DynamicCache(config=model.config)


def _tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        value = list(value.values())
    return sum(_tensor_bytes(v) for v in value) if isinstance(value, (list, tuple)) else 0


def state_bytes(cache: Cache) -> int:
    """Bytes of the tensors that the layers of `cache` hold: a recurrent state (RAM-Net's S, z and
    position offsets; fla's states), or a Transformer's keys and values."""
    return sum(_tensor_bytes(list(vars(layer).values())) for layer in getattr(cache, "layers", []))


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None) -> int:
    """One token from `[vocab]` logits: greedy at temperature 0, else from the tempered distribution
    restricted to the `top_k` most likely tokens (0: all) and to the nucleus of mass `top_p`."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if 0 < top_k < logits.numel():
        logits = logits.masked_fill(logits < logits.topk(top_k).values[-1], float("-inf"))
    probs = logits.softmax(-1)
    if top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > top_p  # tokens after the nucleus is already full
        probs = probs.scatter(0, order, sorted_p.masked_fill(outside, 0))
    return int(torch.multinomial(probs, 1, generator=generator))


def check_sampling(temperature: float, top_k: int, top_p: float, names: dict[str, str] | None = None) -> None:
    """Refuses sampling settings that `sample` cannot use; `names` maps the argument names to how the
    messages call them (the command line's --top-p, ...)."""
    name = (names or {}).get
    if not temperature >= 0:  # NaN too
        raise ValueError(f"{name('temperature', 'temperature')} must be >= 0 (0: greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"{name('top_p', 'top_p')} must be in (0, 1] (1: no nucleus filter), got {top_p}")
    if top_k < 0:
        raise ValueError(f"{name('top_k', 'top_k')} must be >= 0 (0: no top-k filter), got {top_k}")


@torch.no_grad()
def generate_ids(
    model,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int = 50,
    top_p: float = 0.95,
    seed: int | None = None,
    eos_token_id: int | None = None,
    cache: Cache | None = None,
) -> Iterator[int]:
    """Yields new token ids one at a time (stops after `max_new_tokens` or at `eos_token_id`).
    Pass a `cache` (`new_cache(model)`) to inspect the state while generating."""
    if not prompt_ids:
        raise ValueError("the prompt must have at least one token")
    check_sampling(temperature, top_k, top_p)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    cache = new_cache(model) if cache is None else cache
    ids = torch.tensor([prompt_ids], device=device)
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
        token = sample(logits, temperature, top_k, top_p, generator)
        if token == eos_token_id:
            return
        yield token
        ids = torch.tensor([[token]], device=device)


def stream_text(model, tokenizer, prompt: str, max_new_tokens: int, stop_at_eos: bool = True, cache: Cache | None = None, **sampling) -> Iterator[str]:
    """Yields, for every new token, the text that it completes ('' while it ends inside a character).

    The prompt is preceded by the BOS token when the tokenizer has one: in training data every
    document follows an EOS/BOS, so this is how the model has seen texts begin."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    if tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    # Primed with the prompt, so the first new token decodes in context (e.g. a leading space).
    decoder = DecodeStream(ids=prompt_ids, skip_special_tokens=True)
    eos = tokenizer.eos_token_id if stop_at_eos else None
    for token in generate_ids(model, prompt_ids, max_new_tokens, eos_token_id=eos, cache=cache, **sampling):
        yield decoder.step(tokenizer.backend_tokenizer, token) or ""
