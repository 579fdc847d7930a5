"""RAM-Net's own decoding loop: one whole decoding step (embedding, every layer, norm, head, sampler, stop
tokens) as a function of fixed buffers, captured once in a CUDA graph and replayed on CUDA.

Why: with the static cache, transformers' `generate` already compiles the model's forward into a CUDA graph,
but its Python loop around it (logits processors, the sampler, `torch.cat` of the ids, a stop check that
reads the device every step) costs more than the eight layers themselves. Here the loop keeps everything
on the device, and the host looks only every `SYNC_EVERY` steps (one read: are all rows finished? and the
new tokens for a streamer).

`RAMNetForCausalLM._sample` (the method `generate` calls for greedy search and sampling) hands its work
here when `fast_path_applies` says that this loop gives transformers' result: the cache is a fresh
`RAMNetStaticCache` (the default on CUDA, or `cache_implementation="static"`), the logits processors are
only temperature, top-k and top-p, the stopping criteria only the length and stop tokens, no scores or
hidden states are asked for, and no chunked prefill, assistant or synced GPUs. Otherwise transformers'
loop runs, unchanged.

The escape hatch: `generate(..., ramnet_decode_loop=False)` (transformers' loop), `"eager"` (this loop
without the graph), `True`/`"graph"` (graph on CUDA, eager elsewhere: the default); `DECODE_LOOP_BY_DEFAULT
= False` here makes transformers' loop the default. On the CPU the same step runs eagerly: the tests
check it there, token for token against transformers' loop; the graph only replays it.

What `generate` returns is transformers' result: the prompt and the new tokens, rows that stopped early
padded with the pad id, trimmed to the step at which the last row stopped. Sampling draws the same random
numbers as transformers' `torch.multinomial(probs, 1)` (its one-sample path: the argmax of probs / q,
q ~ Exp(1)), so the same seed gives the same tokens.
"""

from __future__ import annotations

import time

import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

from ..cache import RAMNetStaticCache

# Whether `generate` takes this loop where it applies (else transformers' loop, as before).
DECODE_LOOP_BY_DEFAULT = True
# Decoding steps between two host reads (stop check, streaming). A stop is noticed up to this many steps
# late: those steps are wasted work whose tokens are trimmed away, and the cache has seen them.
SYNC_EVERY = 16
# Eager steps on a side stream before the capture (torch's CUDA-graph recipe: lazy initialisations, Triton
# compilation and the allocator's warm-up must not happen inside the capture).
WARMUP_STEPS = 2
# The values of `generate(..., ramnet_decode_loop=...)`; None is the default.
CHOICES = (None, True, False, "graph", "eager")

# Model inputs the loop knows what to do with; any other (a user's extra forward argument) means
# transformers' loop, which passes it to every step.
_KNOWN_MODEL_KWARGS = {"attention_mask", "cache", "past_key_values", "use_cache", "logits_to_keep", "position_ids",
                       "cache_position"}


def fast_path_applies(choice, logits_processor, stopping_criteria, generation_config, synced_gpus: bool,
                      model_kwargs: dict, cache_field: str) -> bool:
    """Whether the loop gives what transformers' `_sample` would, for these arguments of `_sample`."""
    if choice not in CHOICES:
        raise ValueError(f"ramnet_decode_loop must be one of {CHOICES}, got {choice!r}")
    if choice is False or (choice is None and not DECODE_LOOP_BY_DEFAULT):
        return False
    cache = model_kwargs.get(cache_field)
    config = generation_config
    return (
        isinstance(cache, RAMNetStaticCache) and cache.get_seq_length() == 0  # fresh: the prompt fills it
        and not synced_gpus and model_kwargs.get("use_cache", True)
        and not getattr(config, "is_assistant", False) and getattr(config, "prefill_chunk_size", None) is None
        and not (config.return_dict_in_generate and (config.output_scores or config.output_logits
                                                     or config.output_attentions or config.output_hidden_states))
        and set(model_kwargs) <= _KNOWN_MODEL_KWARGS and model_kwargs.get("inputs_embeds") is None
        and all(type(p) in (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper) for p in logits_processor)
        and all(type(c) in (MaxLengthCriteria, EosTokenCriteria) for c in stopping_criteria)
    )


# --- the sampler: transformers' warpers' arithmetic, op for op, so that the same logits keep the same tokens


def apply_temperature(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    return scores / temperature


def keep_top_k(scores: torch.Tensor, top_k: int, filter_value: float = -float("inf")) -> torch.Tensor:
    """Scores below the k-th largest of their row set to `filter_value` (ties at the k-th are kept)."""
    kth = torch.topk(scores, min(top_k, scores.shape[-1]))[0][..., -1, None]
    return scores.masked_fill(scores < kth, filter_value)


def keep_top_p(scores: torch.Tensor, top_p: float, min_tokens_to_keep: int = 1,
               filter_value: float = -float("inf")) -> torch.Tensor:
    """The nucleus: the most likely tokens whose probabilities sum to at least `top_p` (at least
    `min_tokens_to_keep`); every other score set to `filter_value`."""
    sorted_scores, order = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)  # the least likely tokens, as long as they hold <= 1 - top_p
    remove[..., -min_tokens_to_keep:] = False
    return scores.masked_fill(remove.scatter(1, order, remove), filter_value)


def sample_from(probs: torch.Tensor) -> torch.Tensor:
    """One token per row drawn from `probs [B, V]`: argmax(probs / q), q ~ Exp(1), which is exactly what
    `torch.multinomial(probs, 1)` computes (same draws from the same generator), but without its host-side
    checks of the distribution, so it can be captured in a CUDA graph (whose replays advance the generator)."""
    noise = torch.empty_like(probs).exponential_(1)
    return (probs / noise).argmax(dim=-1)


class Sampler:
    """Logits [B, V] -> next tokens [B]: greedy argmax, or the warpers of transformers' list (temperature,
    top-k, top-p, in its order) and a draw."""

    def __init__(self, do_sample: bool, logits_processor=()):
        self.do_sample = do_sample
        self.filters = []
        for p in logits_processor:
            if isinstance(p, TemperatureLogitsWarper):
                self.filters.append(lambda s, p=p: apply_temperature(s, p.temperature))
            elif isinstance(p, TopKLogitsWarper):
                self.filters.append(lambda s, p=p: keep_top_k(s, p.top_k, p.filter_value))
            elif isinstance(p, TopPLogitsWarper):
                self.filters.append(lambda s, p=p: keep_top_p(s, p.top_p, p.min_tokens_to_keep, p.filter_value))
            else:
                raise TypeError(f"the decode loop has no graph-safe form of {type(p).__name__}")

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        scores = logits.float()  # transformers processes fp32 logits
        for keep in self.filters:
            scores = keep(scores)
        if not self.do_sample:
            return scores.argmax(dim=-1)
        return sample_from(scores.softmax(dim=-1))


class DecodeLoop:
    """The decoding of one `generate` call after its prompt: fixed buffers, one step function over them,
    replayed from a CUDA graph (`use_graph`) or run eagerly.

    Buffers (allocated once, never reallocated, so that a captured graph reads and writes them):
      `ids [B, 1]` the token each row feeds next; `tokens [B, max_new_tokens]` every new token, written at
      `step` (a device counter, so nothing on the host changes between replays); `unfinished [B]` rows
      that have not produced a stop token; `lengths [B]` how many tokens each row made before stopping
      (its stop token included), whose max is where the output is trimmed."""

    def __init__(self, model, cache: RAMNetStaticCache, batch: int, max_new_tokens: int, sampler: Sampler,
                 eos: torch.Tensor | None, pad: torch.Tensor | None, device: torch.device):
        self.model, self.cache, self.sampler = model, cache, sampler
        self.max_new_tokens = max_new_tokens
        self.eos = None if eos is None else eos.to(device).reshape(-1)
        self.pad = None if pad is None else pad.to(device=device, dtype=torch.long).reshape(())
        if self.eos is not None and self.pad is None:
            raise ValueError("stop tokens (eos_token_id) need a pad_token_id for the rows that stopped")
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        # Room for the warm-up steps of a capture too, which write past the last token before they are undone.
        self.tokens = torch.zeros(batch, max_new_tokens + WARMUP_STEPS, dtype=torch.long, device=device)
        self.step_index = torch.zeros(1, dtype=torch.long, device=device)
        self.unfinished = torch.ones(batch, dtype=torch.bool, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.capture_s = 0.0

    def choose(self, logits: torch.Tensor) -> None:
        """The next tokens from the last logits [B, V], into the buffers: rows that stopped get the pad id
        (as transformers does), a stop token stops its row."""
        next_tokens = self.sampler(logits)
        if self.eos is not None:
            next_tokens = torch.where(self.unfinished, next_tokens, self.pad)
            self.lengths.add_(self.unfinished.long())
            self.unfinished.logical_and_(~(next_tokens[:, None] == self.eos).any(dim=-1))
        else:
            self.lengths.add_(1)
        self.ids.copy_(next_tokens[:, None])
        self.tokens.index_copy_(1, self.step_index, next_tokens[:, None])
        self.step_index.add_(1)

    def step(self) -> None:
        """One decoding step: the model on `ids` with the static cache (updated in place), then `choose`.
        No host reads, no Python state that changes: what the graph captures."""
        logits = self.model(input_ids=self.ids, cache=self.cache, use_cache=True, logits_to_keep=1,
                            return_dict=True).logits
        self.choose(logits[:, -1])

    def _buffers(self) -> list[torch.Tensor]:
        """Every tensor a step writes: the cache's and the loop's."""
        tensors = [self.ids, self.tokens, self.step_index, self.unfinished, self.lengths]
        for layer in self.cache.layers:
            tensors += [*layer.state, layer.length]
            if layer.conv_history is not None:
                tensors.append(layer.conv_history)
        return tensors

    def capture(self) -> None:
        """Captures `step` in a CUDA graph. The warm-up steps really run (they decode, and draw random
        numbers), so the buffers and the generator's state are saved before and put back after."""
        start = time.perf_counter()
        device = self.ids.device
        saved = [t.clone() for t in self._buffers()]
        rng = torch.cuda.get_rng_state(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self.step()
        torch.cuda.current_stream(device).wait_stream(side)
        # capture_begin/end rather than the `torch.cuda.graph` context, which also runs gc.collect() and
        # empty_cache() on entry: tens of milliseconds in a large process, paid by every generate call.
        torch.cuda.synchronize(device)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):
            self.graph.capture_begin()
            try:
                self.step()
            finally:
                self.graph.capture_end()
        torch.cuda.current_stream(device).wait_stream(side)
        for buffer, copy in zip(self._buffers(), saved):
            buffer.copy_(copy)
        torch.cuda.set_rng_state(rng, device)
        self.capture_s = time.perf_counter() - start

    def run(self, first_logits: torch.Tensor, use_graph: bool, sync_every: int, streamer=None) -> torch.Tensor:
        """The new tokens [B, n] after the prompt's logits [B, V]; `n` as transformers' loop would make."""
        self.choose(first_logits)
        made, streamed, length = 1, 0, None
        if use_graph and self.max_new_tokens > 1:
            self.capture()
        while True:
            if made - streamed >= sync_every or made == self.max_new_tokens:
                # The host's look: one sync every `sync_every` steps.
                any_unfinished = bool(self.unfinished.any()) if self.eos is not None else True
                if not any_unfinished:
                    length = int(self.lengths.max())
                end = made if length is None else length
                if streamer is not None and end > streamed:
                    for column in self.tokens[:, streamed:end].cpu().unbind(1):  # one put per step, as generate
                        streamer.put(column)
                streamed = end
                if length is not None or made == self.max_new_tokens:
                    break
            if self.graph is not None:
                self.graph.replay()
            else:
                self.step()
            made += 1
        return self.tokens[:, :made if length is None else length]


def decode(model, input_ids: torch.Tensor, logits_processor, stopping_criteria, generation_config, streamer,
           model_kwargs: dict, cache_field: str, choice) -> tuple[torch.Tensor, RAMNetStaticCache]:
    """What `_sample` returns (the sequences), by this loop; and the cache. Only where `fast_path_applies`."""
    cache = model_kwargs[cache_field]
    prefill = model.prepare_inputs_for_generation(input_ids, is_first_iteration=True, **model_kwargs)
    first_logits = model(**prefill, return_dict=True).logits[:, -1]
    max_new_tokens = max(1, generation_config.max_length - input_ids.shape[1])  # transformers makes one at least
    eos = next((c.eos_token_id for c in stopping_criteria if isinstance(c, EosTokenCriteria)), None)
    loop = DecodeLoop(model, cache, input_ids.shape[0], max_new_tokens,
                      Sampler(generation_config.do_sample, logits_processor), eos,
                      generation_config._pad_token_tensor if eos is not None else None, first_logits.device)
    use_graph = choice != "eager" and first_logits.device.type == "cuda"
    # A cache the caller gets back must have seen exactly transformers' steps: look every step then.
    cache_returned = generation_config.return_dict_in_generate or getattr(cache, "_is_user_defined", False)
    new = loop.run(first_logits, use_graph, 1 if cache_returned else SYNC_EVERY, streamer)
    model._ramnet_decode_loop_last = dict(graph=loop.graph is not None, capture_s=loop.capture_s,
                                          new_tokens=new.shape[1])
    if streamer is not None:
        streamer.end()
    return torch.cat([input_ids, new.to(input_ids.device)], dim=-1), cache


__all__ = ["DECODE_LOOP_BY_DEFAULT", "DecodeLoop", "Sampler", "SYNC_EVERY", "decode", "fast_path_applies",
           "keep_top_k", "keep_top_p", "sample_from"]
