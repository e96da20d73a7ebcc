import sys, hashlib, torch, json
sys.path.insert(0, '/work/main')
torch.set_num_threads(2)
from checkpoint import load_pretrained, read_checkpoint
from data import PretrainDataset, Tokenizer
from train import PretrainStep, micro_batches, TrainConfig
from losses import LossWeights
h = lambda t: hashlib.md5(t.detach().contiguous().numpy().tobytes()).hexdigest()[:8]
m, meta, _ = load_pretrained(sys.argv[1])
state = meta['state']
cfg = TrainConfig(**meta['train_config'])
tok = Tokenizer.load('/tmp/det/S/tokenizer.json')
ds = PretrainDataset(cfg.data, 'train', tok, 64, 64, train=True, mlm_prob=cfg.mlm_prob, seed=cfg.seed, text_unit=cfg.text_unit)
batch = next(micro_batches(ds, 16, cfg, dict(state)))
step = PretrainStep(m, LossWeights()); m.train()
lines = []
for name, mod in m.named_modules():
    def fh(mm, inp, out, name=name):
        if torch.is_tensor(out):
            lines.append(f"fwd {name} {h(out)}")
            if out.requires_grad:
                out.register_hook(lambda g, name=name: lines.append(f"grad {name} {h(g)}"))
    mod.register_forward_hook(fh)
from train import seed_step
seed_step(0, 0, state['step'])
out = step(batch, itc_only=False); out.total.backward()
for n, p in m.named_parameters():
    if p.grad is not None: lines.append(f"pgrad {n} {h(p.grad)}")
open(sys.argv[2], 'w').write("\n".join(lines))
