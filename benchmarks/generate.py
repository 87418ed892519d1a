"""Generation workload of bench.py: sampling with the KV cache, ours against transformers."""

import torch

from benchmarks.harness import BENCH_MODEL, SEED, Meter, load_hf, load_ours

# -----------------------------------------------------------------------------
# Generation: batch 8, 32-token prompts, exactly 128 new tokens, sampling, KV cache


GEN = dict(batch=8, prompt=32, new=128, warmup=1, steps=2)


def case_generate(impl, weights):
    B, P, N = GEN["batch"], GEN["prompt"], GEN["new"]
    prompts = torch.randint(3, BENCH_MODEL["vocab_size"], (B, P), generator=torch.Generator().manual_seed(SEED))
    meter = Meter(GEN["warmup"])
    if impl == "ours":
        model = load_ours(weights, requires_grad=False)
        meter.start()
        for i in range(GEN["warmup"] + GEN["steps"]):
            # eos_id=-1 never occurs: exactly N tokens per row.
            out = model.generate(prompts.tolist(), N, temperature=1.0, eos_id=-1,
                                 generator=torch.Generator().manual_seed(i))
            assert all(len(o) == N for o in out)
            meter.step()
    else:
        model = load_hf(weights, train=False)
        meter.start()
        for i in range(GEN["warmup"] + GEN["steps"]):
            torch.manual_seed(i)
            with torch.no_grad():
                out = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                                     temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=N, min_new_tokens=N,
                                     pad_token_id=0)
            assert out.shape == (B, P + N)
            meter.step()
    return meter.result(tokens_per_step=B * N)
