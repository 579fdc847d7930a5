"""Streaming generation, for any family of `ramnet train`, through transformers' `model.generate` (its
sampling, stop tokens and caches) with a `TextIteratorStreamer` in another thread handing out the tokens
as they come. The prompt is read in one parallel pass; then each new token is one step. For RAM-Net
that step reads and writes K slots per head of a fixed-size state, so the memory and the time per token
do not grow with the context, unlike a Transformer's KV cache (fla's models keep a fixed-size state too).
A RAM-Net model decodes with its cache's fused step; with the static cache (`RAMNetForCausalLM.new_cache`, the default on CUDA)
`generate` runs RAM-Net's decode loop (`ramnet/models/ramnet/decode_loop.py`): the whole step, sampler included,
replayed as a CUDA graph on CUDA, the tokens handed to the streamer every few steps.

Stopping early (the caller leaves the loop) goes through the streamer: its next `put` raises, which ends
`generate` in its thread. A stopping criterion would do it too, but would take RAM-Net's decode loop
(which knows only the length and stop tokens) off the fast path."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import torch
from tokenizers.decoders import DecodeStream
from transformers import Cache, DynamicCache, TextIteratorStreamer

from ..models import RAMNetConfig
from ..models.ramnet.modeling_ramnet import CACHE_FIELD


def new_cache(model) -> Cache:
    """An empty cache of the kind `model` generates with: RAM-Net's own (`RAMNetForCausalLM.new_cache`'s
    default), fla's `Cache`, or
    transformers' `DynamicCache` (Transformer++)."""
    if model.config.model_type == RAMNetConfig.model_type:
        return model.new_cache()
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


def check_sampling(temperature: float, top_k: int, top_p: float, names: dict[str, str] | None = None) -> None:
    """Refuses sampling settings that `sampling_settings` cannot map; `names` maps the argument names to
    how the messages call them (the command line's --top-p, ...)."""
    name = (names or {}).get
    if not temperature >= 0:  # NaN too
        raise ValueError(f"{name('temperature', 'temperature')} must be >= 0 (0: greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"{name('top_p', 'top_p')} must be in (0, 1] (1: no nucleus filter), got {top_p}")
    if top_k < 0:
        raise ValueError(f"{name('top_k', 'top_k')} must be >= 0 (0: no top-k filter), got {top_k}")


def sampling_settings(temperature: float, top_k: int, top_p: float) -> dict:
    """`generate`'s arguments for these options: greedy at temperature 0, else sampling from the tempered
    distribution restricted to the `top_k` most likely tokens (0: all) and to the nucleus of mass `top_p`
    (1: all). A filter that is off is None, so that no default of the model's generation config applies."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return dict(do_sample=False, temperature=None, top_k=None, top_p=None)
    return dict(do_sample=True, temperature=float(temperature), top_k=top_k or None, top_p=top_p if top_p < 1 else None)


class TokenStreamer(TextIteratorStreamer):
    """`TextIteratorStreamer` (the queue between `generate`'s thread and the caller, an iterator that ends
    with the generation) handing out every new token as `(token, text)`: the text that the token
    completes ('' while it ends inside a character), from a `DecodeStream` primed with the prompt so
    that the first token decodes in context (a leading space); None without a tokenizer.
    `TextIteratorStreamer` itself holds text back to word boundaries, which would leave the caller
    no count of the tokens and no way to stop at one."""

    def __init__(self, tokenizer=None, prompt_ids: list[int] = (), timeout: float | None = None,
                 cancelled: threading.Event | None = None):
        super().__init__(tokenizer, skip_prompt=True, timeout=timeout)
        self._decoder = None if tokenizer is None else DecodeStream(ids=list(prompt_ids), skip_special_tokens=True)
        self.cancelled = cancelled  # set by the caller once it stops reading: the next put ends generate

    def put(self, value: torch.Tensor) -> None:
        if self.cancelled is not None and self.cancelled.is_set():
            raise _Cancelled
        if self.next_tokens_are_prompt:  # generate's first call hands over the prompt
            self.next_tokens_are_prompt = False
            return
        for token in value.reshape(-1).tolist():  # one sequence: one token per call
            text = None if self._decoder is None else self._decoder.step(self.tokenizer.backend_tokenizer, token) or ""
            self.text_queue.put((token, text), timeout=self.timeout)

    def end(self) -> None:
        self.text_queue.put(self.stop_signal, timeout=self.timeout)


class _Cancelled(Exception):
    """Raised by `TokenStreamer.put` in `generate`'s thread once the caller has stopped reading (it left
    the loop, or an error came): it ends `generate` there."""


def check_prompt(prompt_ids: list[int]) -> None:
    if len(prompt_ids) == 0:
        raise ValueError("the prompt is empty: generation needs at least one token to continue from")


def _stream(model, prompt_ids: list[int], tokenizer, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
            seed: int | None, eos_token_id: int | None, cache: Cache | None) -> Iterator[tuple[int, str | None]]:
    """`(token, text)` for every new token of `model.generate`, run in a thread; stops before `eos_token_id`."""
    check_prompt(prompt_ids)
    settings = sampling_settings(temperature, top_k, top_p)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if max_new_tokens == 0:
        return
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    # Any pad id will do for one sequence; given, generate does not warn that it picked one itself.
    pad = next((p for p in (model.generation_config.pad_token_id, eos_token_id) if p is not None), 0)
    cancelled = threading.Event()
    streamer = TokenStreamer(tokenizer, prompt_ids, cancelled=cancelled)
    errors: list[BaseException] = []
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                  pad_token_id=pad, streamer=streamer, **settings)
    if cache is not None:
        kwargs[CACHE_FIELD] = cache

    def run():
        try:
            # A seed draws this generation's samples only: the caller's random state is restored after.
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=seed is not None):
                if seed is not None:
                    torch.manual_seed(seed)
                model.generate(ids, **kwargs)
        except _Cancelled:  # the caller stopped reading: nothing to hand over
            pass
        except BaseException as error:  # handed to the caller's thread, which raises it
            errors.append(error)
            streamer.end()

    thread = threading.Thread(target=run, name="ramnet-generate", daemon=True)
    thread.start()
    try:
        for token, text in streamer:
            if token == eos_token_id:
                break
            yield token, text
    finally:
        cancelled.set()
        thread.join()
    if errors:
        raise errors[0]


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
    """Yields new token ids one at a time (stops after `max_new_tokens` or at `eos_token_id`, which is
    not yielded). Pass a `cache` (`new_cache(model)`) to inspect the state while generating."""
    for token, _ in _stream(model, prompt_ids, None, max_new_tokens, temperature, top_k, top_p, seed, eos_token_id,
                            cache):
        yield token


def stream_text(model, tokenizer, prompt: str, max_new_tokens: int, stop_at_eos: bool = True, cache: Cache | None = None,
                temperature: float = 0.8, top_k: int = 50, top_p: float = 0.95, seed: int | None = None) -> Iterator[str]:
    """Yields, for every new token, the text that it completes ('' while it ends inside a character).

    The prompt is preceded by the BOS token when the tokenizer has one: in training data every
    document follows an EOS/BOS, so this is how the model has seen texts begin (and an empty prompt
    starts from it). Without a BOS token an empty prompt is refused."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    if tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    elif not prompt_ids:
        raise ValueError("the prompt is empty and the tokenizer has no BOS token to start from: give a prompt")
    eos = tokenizer.eos_token_id if stop_at_eos else None
    for _, text in _stream(model, prompt_ids, tokenizer, max_new_tokens, temperature, top_k, top_p, seed, eos, cache):
        yield text
