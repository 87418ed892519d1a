# Run under torchrun by tests/test_fsdp.py: load an HF directory into the FSDP2-sharded model (each rank
# reads only its rows), compute logits, export again. Not a test module itself.
import sys

import numpy as np
import torch

import common

src, out, logits_path = sys.argv[1:4]
d = common.setup_dist("cpu")
model, cfg = common.build_model(src, d)
x = torch.tensor(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 13)))
with torch.no_grad():
    logits = model(x)
if d.main:
    np.save(logits_path, logits.float().numpy())
common.export_hf(model, cfg, out, d, dtype=torch.float32)
common.shutdown()  # barrier, then tear gloo down: exiting with the group alive can abort at exit
