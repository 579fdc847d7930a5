"""``model.generate`` as it was when issue 17 was filed: the tree at 85c706f^ (the parent of the commit that put
the fused step into the model) with its `small` preset, random weights, bf16 on CUDA, B=1, prompt 512, greedy,
the model's default cache and transformers' loop; ms per decoding step ((t_64 - t_1) / 63, each the best of two
calls). The baseline of issue 17's "eager generate 5x" target, measured on the machine of the run it is
compared with (the issue's 13.2 ms was an H200's; a host's speed moves eager numbers 2x):

    git archive 85c706f^ ramnet | tar -x -C /tmp/then
    python benchmarks/generate_then.py /tmp/then    # that tree's package first on sys.path
"""

import argparse
import sys
import time

import torch

NEW_TOKENS = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tree", help="a directory holding the old tree's ramnet package")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    sys.path.insert(0, args.tree)
    import ramnet
    from ramnet.lm import families
    from ramnet.lm.config import load_config

    print("ramnet from", ramnet.__file__)
    config = load_config("small")
    kwargs = dict(config.model, vocab_size=32000, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = families.build(config.model_type, kwargs).to(args.device, dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    ids = torch.randint(3, 32000, (1, 512), generator=torch.Generator().manual_seed(0)).to(args.device)

    def timed(new_tokens: int) -> float:
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed(8)  # warm-up
    t_n = min(timed(NEW_TOKENS) for _ in range(2))
    t_1 = min(timed(1) for _ in range(2))
    params = sum(p.numel() for p in model.parameters())
    print(f"old (85c706f^) small {params:,} params: {(t_n - t_1) / (NEW_TOKENS - 1) * 1e3:.3f} ms per token, "
          f"{NEW_TOKENS / t_n:.1f} tok/s ({NEW_TOKENS} new tokens, prefill included)")


if __name__ == "__main__":
    main()
