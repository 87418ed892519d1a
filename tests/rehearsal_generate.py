# Under TRITON_INTERPRET=1: a local model built by generation.load_client as feedback.py and eval.py build it, on
# the torch path (fp32, CPU) and through the rehearsal of the GPU path (--rehearse_gpu: bf16, attention through
# the Triton kernels), for tests/test_rehearsal.py. For each: greedy generation (KV cache, left-padded prompts)
# and a local judge's next-token logits (generation.last_logits: left padding, segment -1 in the kernels).
#   TRITON_INTERPRET=1 python tests/rehearsal_generate.py MODEL_DIR PROMPTS.json OUT.json
import json
import sys
import types

import torch

import common
import generation


def run(model_dir, prompts, rehearse):
    d = common.Dist(0, 1, 0, torch.device("cpu"), rehearse)        # no process group: nothing is distributed
    cfg = types.SimpleNamespace(dtype="auto")                          # auto: bf16 on the GPU path, else fp32
    client = generation.load_client(generation.parse_spec(model_dir, "models"), cfg, d, {})
    model = client.model
    greedy = model.generate(prompts, max_new_tokens=8, temperature=0.0, eos_id=-1, pad_id=0)
    logits = generation.last_logits(model, prompts, pad_id=0).float()
    return dict(dtype=str(model.lm_head.weight.dtype), kernels_on_cpu=model.kernels_on_cpu, greedy=greedy,
                logits=logits.tolist())


def main(model_dir, prompts_path, out_path):
    with open(prompts_path) as f:
        prompts = json.load(f)
    result = {"torch": run(model_dir, prompts, False), "rehearsal": run(model_dir, prompts, True)}
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
