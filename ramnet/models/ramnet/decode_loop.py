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
without the graph), `True`/`"graph"` (graph on CUDA, eager elsewhere: the default), `"compiled"` (the model's
step through `torch.compile` first, then as `"graph"`: fewer, fused kernels in the graph, for a compile of
tens of seconds at a loop's first call); `DECODE_LOOP_BY_DEFAULT
= False` here makes transformers' loop the default. On the CPU the same step runs eagerly: the tests
check it there, token for token against transformers' loop; the graph only replays it.

The loop (buffers, a static cache of its own, the captured graph) is kept on the model between calls
with the same `loop_key` (batch, device, weights, sampler settings, stop and pad ids, the cache's layout,
the output length rounded up by `token_capacity`), the `MAX_RETAINED_LOOPS` least recently used ones;
a call of a kept key resets the loop's counters and replays, without a capture. The caller's cache is
filled by the prompt and copied in and out (`decode` says why). `RAMNetForCausalLM.clear_decode_graphs()`
drops them.

What `generate` returns is transformers' result: the prompt and the new tokens, rows that stopped early
padded with the pad id, trimmed to the step at which the last row stopped. Sampling draws the same random
numbers as transformers' `torch.multinomial(probs, 1)` (its one-sample path: the argmax of probs / q,
q ~ Exp(1)), so the same seed gives the same tokens.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import OrderedDict

import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

from ..cache import RAMNetStaticCache

# Whether `generate` takes this loop where it applies (else transformers' loop, as before).
DECODE_LOOP_BY_DEFAULT = True
# Whether that default holds for CUDA inputs too: on since tests/models/test_generation_cuda.py passed on a GPU
# (an H100, 2026-12-07: the captured loop gives the eager loop's and the full forward's tokens, sampling,
# streaming, left padding and stop tokens included). False sends CUDA back to transformers' loop over the
# static cache's compiled step; `ramnet_decode_loop=` chooses per call whatever this says.
BY_DEFAULT_ON_CUDA = True
# Decoding steps between two host reads (stop check, streaming). A stop is noticed up to this many steps
# late: those steps are wasted work whose tokens are trimmed away, and the cache has seen them.
SYNC_EVERY = 16
# Eager steps on a side stream before the capture (torch's CUDA-graph recipe: lazy initialisations, Triton
# compilation and the allocator's warm-up must not happen inside the capture).
WARMUP_STEPS = 2
# Decode loops (buffers, cache buffers, captured graph) kept on the model between `generate` calls, least
# recently used dropped first; `RAMNetForCausalLM.clear_decode_graphs()` drops them all.
MAX_RETAINED_LOOPS = 3
# The output buffer's length: max_new_tokens rounded up to a power of two, at least this, so nearby lengths
# (and max_new_tokens=1, a prefill) share one loop and one graph.
MIN_TOKEN_CAPACITY = 256
# The values of `generate(..., ramnet_decode_loop=...)`; None is the default.
CHOICES = (None, True, False, "graph", "eager", "compiled")

# Model inputs the loop knows what to do with; any other (a user's extra forward argument) means
# transformers' loop, which passes it to every step.
_KNOWN_MODEL_KWARGS = {"attention_mask", "cache", "past_key_values", "use_cache", "logits_to_keep", "position_ids",
                       "cache_position"}


def default_choice(choice, device: torch.device):
    """`generate`'s `ramnet_decode_loop` for inputs on `device`: the caller's, or for None on CUDA, False
    (transformers' loop) unless `BY_DEFAULT_ON_CUDA`."""
    if choice is None and device.type == "cuda" and not BY_DEFAULT_ON_CUDA:
        return False
    return choice


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


def warper_settings(warper) -> tuple:
    """A transformers warper as (the name of its filter here, its settings): what a captured step bakes in."""
    if isinstance(warper, TemperatureLogitsWarper):
        return ("temperature", float(warper.temperature))
    if isinstance(warper, TopKLogitsWarper):
        return ("top_k", int(warper.top_k), float(warper.filter_value))
    if isinstance(warper, TopPLogitsWarper):
        return ("top_p", float(warper.top_p), int(warper.min_tokens_to_keep), float(warper.filter_value))
    raise TypeError(f"the decode loop has no graph-safe form of {type(warper).__name__}")


FILTERS = {"temperature": apply_temperature, "top_k": keep_top_k, "top_p": keep_top_p}


class Sampler:
    """Logits [B, V] -> next tokens [B]: greedy argmax, or the warpers of transformers' list (temperature,
    top-k, top-p, in its order) and a draw. `key`: what of it a captured step bakes in."""

    def __init__(self, do_sample: bool, logits_processor=()):
        self.do_sample = bool(do_sample)
        self.settings = tuple(warper_settings(p) for p in logits_processor)

    @property
    def key(self) -> tuple:
        return (self.do_sample, self.settings)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        scores = logits.float()  # transformers processes fp32 logits
        for name, *settings in self.settings:
            scores = FILTERS[name](scores, *settings)
        if not self.do_sample:
            return scores.argmax(dim=-1)
        return sample_from(scores.softmax(dim=-1))


def cache_tensors(cache: RAMNetStaticCache) -> list[torch.Tensor]:
    """Every buffer of a static cache that a decoding step reads or writes, in a fixed order."""
    tensors = []
    for layer in cache.layers:
        if layer.state is None:
            raise ValueError("the static cache has no buffers yet: the prompt allocates them")
        tensors += [*layer.state, layer.length]
        if layer.conv_history is not None:
            tensors.append(layer.conv_history)
    return tensors


def copy_cache(source: RAMNetStaticCache, target: RAMNetStaticCache) -> None:
    """`source`'s state into `target`'s buffers (same configuration, same batch), in place."""
    for to, value in zip(cache_tensors(target), cache_tensors(source), strict=True):
        to.copy_(value)


def clone_cache(cache: RAMNetStaticCache, config) -> RAMNetStaticCache:
    """A new static cache with buffers of its own, holding `cache`'s state."""
    clone = RAMNetStaticCache(config)
    for mine, theirs in zip(clone.layers, cache.layers, strict=True):
        if theirs.state is None:
            raise ValueError("the static cache has no buffers yet: the prompt allocates them")
        mine.store(theirs.state, None, theirs.conv_history, 0)  # allocates copies
        mine.length.copy_(theirs.length)
    return clone


def cache_layout(cache: RAMNetStaticCache) -> tuple:
    """The cache's configuration as a step sees it: every buffer's shape and dtype (the batch, the layers,
    the state's size, the short convolution's history), and where it lives."""
    return tuple((tuple(t.shape), t.dtype, str(t.device)) for t in cache_tensors(cache))


def token_capacity(max_new_tokens: int) -> int:
    """The output buffer's length for `max_new_tokens`: the next power of two, at least `MIN_TOKEN_CAPACITY`."""
    return max(MIN_TOKEN_CAPACITY, 1 << (max(1, max_new_tokens) - 1).bit_length())


def model_key(model) -> tuple:
    """What of the model a captured step bakes in: the addresses of its weights (a move to another device
    or dtype, or a replaced parameter, changes them; weights updated in place keep them, and a replay reads
    the new values), their dtype, and train/eval mode."""
    return (model.dtype, model.training, tuple(p.data_ptr() for p in model.parameters()))


def loop_key(model, cache: RAMNetStaticCache, batch: int, max_new_tokens: int, sampler: tuple,
             eos: torch.Tensor | None, pad: torch.Tensor | None, use_graph: bool, compiled: bool = False) -> tuple:
    """The key under which a decode loop (and its graph) is kept: two calls with the same key can replay
    one captured step. The prompt's length is not in it: the state has the same size after any prompt."""
    return (
        batch, str(cache_tensors(cache)[0].device), model_key(model), sampler,
        None if eos is None else tuple(int(t) for t in eos.reshape(-1).tolist()),
        None if pad is None else int(pad), token_capacity(max_new_tokens), cache_layout(cache), bool(use_graph),
        bool(compiled),
    )


def next_logits(model, ids: torch.Tensor, cache: RAMNetStaticCache) -> torch.Tensor:
    """The model's logits [B, V] for the next token after `ids [B, 1]`, updating `cache` in place."""
    return model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1, return_dict=True).logits[:, -1]


def compile_step(fn):
    """``fn`` through ``torch.compile`` (static shapes), rounding as eager does: inductor keeps a fused
    kernel's bf16 intermediates in fp32 unless ``emulate_precision_casts``, which made a bf16 model's
    compiled step differ from the eager one in the last bits (4e-3 in the logits at the first step, growing
    through the recurrent state), and the greedy tokens from the first steps on (H100,
    ``benchmarks/results/generate_h100.md``). With it, the same bits on the CPU (``tests/models``)."""
    return torch.compile(fn, dynamic=False, options={"emulate_precision_casts": True})


class DecodeLoop:
    """The decoding after a prompt: fixed buffers, one step function over them, replayed from a CUDA graph
    (`use_graph`) or run eagerly. Kept on the model between `generate` calls with the same `loop_key`
    (`retained_loop`), so that the graph is captured once per key: `reset` starts each call.

    Buffers (allocated once, never reallocated, so that a captured graph reads and writes them):
      `ids [B, 1]` the token each row feeds next; `tokens [B, capacity]` every new token, written at
      `step` (a device counter, so nothing on the host changes between replays); `unfinished [B]` rows
      that have not produced a stop token; `lengths [B]` how many tokens each row made before stopping
      (its stop token included), whose max is where the output is trimmed; and `cache`, a static cache
      whose buffers the step updates (the loop's own when it is retained: `decode` copies the caller's
      cache in and out)."""

    def __init__(self, model, cache: RAMNetStaticCache, batch: int, capacity: int, sampler: Sampler,
                 eos: torch.Tensor | None, pad: torch.Tensor | None, device: torch.device, compiled: bool = False):
        # A weak reference: a loop kept on the model must not keep the model alive.
        self._model = weakref.ref(model)
        # The model's step, `torch.compile`d where asked for (compiled at the first step: before a capture,
        # in its warm-up). Every loop compiles the same function: past torch's recompile limit
        # (`torch._dynamo.config.recompile_limit`, 8 models x batch sizes in a process) it runs eagerly.
        self.next_logits = compile_step(next_logits) if compiled else next_logits
        self.cache, self.sampler = cache, sampler
        self.capacity = capacity
        self.eos = None if eos is None else eos.to(device).reshape(-1)
        self.pad = None if pad is None else pad.to(device=device, dtype=torch.long).reshape(())
        if self.eos is not None and self.pad is None:
            raise ValueError("stop tokens (eos_token_id) need a pad_token_id for the rows that stopped")
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        # Room for the warm-up steps of a capture too, which write past the last token before they are undone.
        self.tokens = torch.zeros(batch, capacity + WARMUP_STEPS, dtype=torch.long, device=device)
        self.step_index = torch.zeros(1, dtype=torch.long, device=device)
        self.unfinished = torch.ones(batch, dtype=torch.bool, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.capture_s = 0.0  # the last capture's time
        self.captures = 0  # how many times this loop captured its step (1 once it has a graph)
        self.runs = 0  # how many `generate` calls it decoded
        self.graph_pool_bytes = 0  # memory the graph's private pool reserved at its capture (CUDA)
        self.lock = threading.Lock()  # held by the call that decodes with it

    @property
    def model(self):
        model = self._model()
        if model is None:
            raise RuntimeError("the model of this decode loop is gone")
        return model

    def reset(self) -> None:
        """The loop's own buffers as before a call's first token (in place: a captured graph keeps them)."""
        self.ids.zero_()
        self.tokens.zero_()
        self.step_index.zero_()
        self.unfinished.fill_(True)
        self.lengths.zero_()

    def held_bytes(self) -> int:
        """Device memory this loop keeps: its buffers, its cache's, and the graph's pool (as reserved at its
        capture: the step's intermediate tensors)."""
        return sum(t.numel() * t.element_size() for t in self._buffers()) + self.graph_pool_bytes

    def release(self) -> None:
        """Drops the graph (its private memory pool goes back to the allocator); the buffers go with the loop."""
        if self.graph is not None:
            if self.ids.is_cuda:
                torch.cuda.synchronize(self.ids.device)  # no replay still running in the pool
            self.graph.reset()
            self.graph = None

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
        self.choose(self.next_logits(self.model, self.ids, self.cache))

    def _buffers(self) -> list[torch.Tensor]:
        """Every tensor a step writes: the cache's and the loop's."""
        return [self.ids, self.tokens, self.step_index, self.unfinished, self.lengths, *cache_tensors(self.cache)]

    def capture(self) -> None:
        """Captures `step` in a CUDA graph. The warm-up steps really run (they decode, and draw random
        numbers), so the buffers and the generator's state are saved before and put back after.

        The random numbers: the capture registers the device's default CUDA generator with the graph, and
        every replay reads that generator's seed and offset at replay time and advances the offset by what
        one step draws (torch's graph-safe Philox state: `replay_prologue`), as an eager step would. So
        `torch.manual_seed` (or `set_rng_state`) before a later `generate` call is honoured by the graph
        captured in an earlier call, and the same seed gives the same tokens in every call. (Only
        `torch.cuda.graphsafe_set_state`, which swaps the generator's state object, would leave a kept
        graph on the old one: `clear_decode_graphs()` after it.)"""
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
        # empty_cache() on entry: tens of milliseconds in a large process.
        torch.cuda.synchronize(device)
        reserved = torch.cuda.memory_reserved(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):
            graph.capture_begin()
            try:
                self.step()
            finally:
                graph.capture_end()
        torch.cuda.current_stream(device).wait_stream(side)
        # The capture's allocations come from the graph's private pool, never from blocks cached before.
        self.graph_pool_bytes = torch.cuda.memory_reserved(device) - reserved
        for buffer, copy in zip(self._buffers(), saved):
            buffer.copy_(copy)
        torch.cuda.set_rng_state(rng, device)
        self.graph = graph
        self.captures += 1
        self.capture_s = time.perf_counter() - start

    def run(self, first_logits: torch.Tensor, max_new_tokens: int, use_graph: bool, sync_every: int,
            streamer=None) -> torch.Tensor:
        """The new tokens [B, n] after the prompt's logits [B, V]; `n` as transformers' loop would make
        (at most `max_new_tokens`, which must fit the buffer). Starts from `reset`; captures the step at
        the first call that needs it (`use_graph`), replays it after that. The result is a view of
        `tokens`: copy it before the next call."""
        if not 1 <= max_new_tokens <= self.capacity:
            raise ValueError(f"max_new_tokens must be in [1, {self.capacity}], got {max_new_tokens}")
        self.runs += 1
        self.reset()
        self.choose(first_logits)
        made, streamed, length = 1, 0, None
        if use_graph and max_new_tokens > 1 and self.graph is None:
            self.capture()
        while True:
            if made - streamed >= sync_every or made == max_new_tokens:
                # The host's look: one sync every `sync_every` steps.
                any_unfinished = bool(self.unfinished.any()) if self.eos is not None else True
                if not any_unfinished:
                    length = int(self.lengths.max())
                end = made if length is None else length
                if streamer is not None and end > streamed:
                    for column in self.tokens[:, streamed:end].cpu().unbind(1):  # one put per step, as generate
                        streamer.put(column)
                streamed = end
                if length is not None or made == max_new_tokens:
                    break
            if use_graph and self.graph is not None:
                self.graph.replay()
            else:
                self.step()
            made += 1
        return self.tokens[:, :made if length is None else length]


class RetainedLoops(OrderedDict):
    """A model's kept decode loops, `loop_key` -> `DecodeLoop`, least recently used first. A copy of the
    model (`copy.deepcopy`, pickling) starts without any: graphs and buffers belong to this model."""

    def __deepcopy__(self, memo):
        return RetainedLoops()

    def __reduce__(self):
        return (RetainedLoops, ())


_REGISTRY_LOCK = threading.Lock()


def retained_loops(model) -> RetainedLoops:
    """The loops kept on `model` (created empty at the first use)."""
    loops = model.__dict__.get("_ramnet_decode_loops")
    if loops is None:
        with _REGISTRY_LOCK:
            loops = model.__dict__.setdefault("_ramnet_decode_loops", RetainedLoops())
    return loops


def clear_loops(model) -> int:
    """Drops every decode loop kept on `model` (their graphs and buffers); how many there were."""
    loops = model.__dict__.get("_ramnet_decode_loops")
    if not loops:
        return 0
    with _REGISTRY_LOCK:
        dropped = list(loops.values())
        loops.clear()
    for loop in dropped:
        with loop.lock:  # not while a call decodes with it
            loop.release()
    return len(dropped)


def acquire_loop(model, key: tuple, build) -> tuple[DecodeLoop, bool, bool]:
    """The kept loop for `key` (built by `build()` and kept at its first use, the least recently used one
    dropped beyond `MAX_RETAINED_LOOPS`), locked for the caller; (loop, whether it was kept before, whether
    it is kept). A loop another thread is decoding with is not shared: the caller gets a loop of its own,
    not kept."""
    loops = retained_loops(model)
    with _REGISTRY_LOCK:
        loop = loops.get(key)
        if loop is not None and loop.lock.acquire(blocking=False):
            loops.move_to_end(key)
            return loop, True, True
        busy = loop is not None
    loop = build()
    loop.lock.acquire()
    if busy or MAX_RETAINED_LOOPS <= 0:
        return loop, False, False
    dropped = []
    with _REGISTRY_LOCK:
        loops[key] = loop
        while len(loops) > MAX_RETAINED_LOOPS:
            dropped.append(loops.popitem(last=False)[1])
    for old in dropped:
        with old.lock:
            old.release()
    return loop, False, True


def decode(model, input_ids: torch.Tensor, logits_processor, stopping_criteria, generation_config, streamer,
           model_kwargs: dict, cache_field: str, choice) -> tuple[torch.Tensor, RAMNetStaticCache]:
    """What `_sample` returns (the sequences), by this loop; and the cache. Only where `fast_path_applies`.

    The loop, its graph and the buffers the graph closes over are kept on the model between calls with
    the same `loop_key`, the cache's buffers included: a kept loop has a static cache of its own. The
    prompt fills the caller's cache (transformers' prefill, unchanged); its state is copied into the
    loop's cache, the steps update that one, and the final state is copied back into the caller's. Why
    not decode in the caller's cache: a captured graph reads and writes fixed addresses, and every call
    brings a fresh cache (new buffers). Why not hand the loop's buffers to the caller's cache: a cache the
    caller gets back (`return_dict_in_generate`, or one it passed) would share its buffers with the kept
    loop, and the next call would overwrite it. The two copies cost a few MB per sequence, device to
    device (about 4 MB for `small`), against tens of milliseconds for a capture."""
    cache = model_kwargs[cache_field]
    prefill = model.prepare_inputs_for_generation(input_ids, is_first_iteration=True, **model_kwargs)
    first_logits = model(**prefill, return_dict=True).logits[:, -1]
    max_new_tokens = max(1, generation_config.max_length - input_ids.shape[1])  # transformers makes one at least
    eos = next((c.eos_token_id for c in stopping_criteria if isinstance(c, EosTokenCriteria)), None)
    pad = generation_config._pad_token_tensor if eos is not None else None
    use_graph = choice != "eager" and first_logits.device.type == "cuda"
    batch = input_ids.shape[0]
    sampler = Sampler(generation_config.do_sample, logits_processor)
    compiled = choice == "compiled"
    key = loop_key(model, cache, batch, max_new_tokens, sampler.key, eos, pad, use_graph, compiled)

    def build() -> DecodeLoop:
        return DecodeLoop(model, clone_cache(cache, model.config), batch, token_capacity(max_new_tokens), sampler, eos,
                          pad, first_logits.device, compiled)

    loop, reused, kept = acquire_loop(model, key, build)
    try:
        captures = loop.captures
        steps = max_new_tokens > 1
        if steps and reused:
            copy_cache(cache, loop.cache)  # a new loop's cache is a copy already
        # A cache the caller gets back must have seen exactly transformers' steps: look every step then.
        cache_returned = generation_config.return_dict_in_generate or getattr(cache, "_is_user_defined", False)
        new = loop.run(first_logits, max_new_tokens, use_graph, 1 if cache_returned else SYNC_EVERY, streamer)
        new = new.to(input_ids.device, copy=True)  # out of the loop's buffer before the next call
        if steps:
            copy_cache(loop.cache, cache)  # the caller's cache ends where the steps left the state
        model._ramnet_decode_loop_last = dict(
            graph=use_graph and steps and loop.graph is not None, compiled=compiled,
            captured=loop.captures > captures, capture_s=loop.capture_s if loop.captures > captures else 0.0,
            reused=reused, kept=kept,
            captures=loop.captures, held_bytes=loop.held_bytes(), new_tokens=new.shape[1])
    finally:
        loop.lock.release()
        if not kept:
            loop.release()
    if streamer is not None:
        streamer.end()
    return torch.cat([input_ids, new], dim=-1), cache


__all__ = ["BY_DEFAULT_ON_CUDA", "DECODE_LOOP_BY_DEFAULT", "FILTERS", "MAX_RETAINED_LOOPS", "MIN_TOKEN_CAPACITY",
           "SYNC_EVERY", "DecodeLoop", "RetainedLoops", "Sampler", "clear_loops", "decode", "default_choice",
           "fast_path_applies", "keep_top_k", "keep_top_p", "loop_key", "retained_loops", "sample_from",
           "token_capacity", "warper_settings"]
