"""``model.generate`` as it was when issue 17 was filed: the tree at 85c706f^ (the parent of the commit that
put the fused step into the model) with its `small` preset, random weights, bf16 on CUDA, B=1, prompt 512,
greedy, the model's default cache and transformers' loop; ms per decoding step ((t_64 - t_1) / 63, each the
best of two calls). The baseline of issue 17's "eager generate 5x" target, measured on the machine of the
run it is compared with (the issue's 13.2 ms was an H200's; a host's speed moves eager numbers 2x):

    git archive 85c706f^ ramnet | tar -x -C /tmp/then
    python benchmarks/generate_then.py /tmp/then    # the old package first on sys.path
"""
import sys, time
sys.path.insert(0, sys.argv[1])
import torch
from ramnet.lm.config import load_config
from ramnet.lm import families
import ramnet
print("ramnet from", ramnet.__file__)
cfg = load_config("small")
kwargs = dict(cfg.model, vocab_size=32000, bos_token_id=1, eos_token_id=2, pad_token_id=0)
torch.manual_seed(0)
model = families.build(cfg.model_type, kwargs).to("cuda", torch.bfloat16).eval()
model.generation_config.eos_token_id = None
model.generation_config.pad_token_id = 0
ids = torch.randint(3, 32000, (1, 512), generator=torch.Generator().manual_seed(0)).cuda()
kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
def run(n):
    torch.cuda.synchronize(); t = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
    torch.cuda.synchronize(); return time.perf_counter() - t
run(8)
t_n = min(run(64) for _ in range(2)); t_1 = min(run(1) for _ in range(2))
print(f"old (85c706f^) small {sum(p.numel() for p in model.parameters()):,} params: {(t_n - t_1) / 63 * 1e3:.3f} ms per token, "
      f"{64 / t_n:.1f} tok/s (64 new tokens, prefill included)")
