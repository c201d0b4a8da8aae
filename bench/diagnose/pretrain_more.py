import sys; sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parents[1]))
from pathlib import Path

import families as f
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

torch.set_num_threads(2)
src, out, steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
tok = AutoTokenizer.from_pretrained(src); model = AutoModelForMaskedLM.from_pretrained(src)
text = f.pretraining_text(); enc = tok(text, truncation=True, max_length=64)["input_ids"]
g = torch.Generator().manual_seed(5); torch.manual_seed(5)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * max(0.0, (steps - s) / steps))
special = torch.tensor(sorted(set(tok.all_special_ids))); model.train(); losses = []
for step in range(steps):
    idx = torch.randint(len(enc), (32,), generator=g).tolist()
    b = tok.pad({"input_ids": [enc[i] for i in idx]}, return_tensors="pt")
    ids, labels = b["input_ids"].clone(), b["input_ids"].clone()
    pick = (torch.rand(ids.shape, generator=g) < 0.15) & ~torch.isin(ids, special)
    labels[~pick] = -100; ids[pick] = tok.mask_token_id
    loss = model(input_ids=ids, attention_mask=b["attention_mask"], labels=labels).loss
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); sched.step()
    losses.append(float(loss.detach()))
    if step % 200 == 0 or step == steps - 1: print(step, sum(losses[-50:]) / len(losses[-50:]), flush=True)
model.eval(); out.mkdir(parents=True, exist_ok=True); model.save_pretrained(out, safe_serialization=True); tok.save_pretrained(out)
