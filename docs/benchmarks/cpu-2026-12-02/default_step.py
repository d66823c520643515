"""CPU time of one bare-loop step of the default train.py model (1 thread), the base that
Lightning's per-step overhead is a share of."""
import os, statistics, time, torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from spannorm.bench import BareLoop, quiet_lightning
torch.set_num_threads(1); quiet_lightning()
with initialize_config_dir(config_dir=os.path.abspath("conf"), version_base="1.3"):
    cfg = compose("train")
torch.manual_seed(0)
lm = instantiate(cfg.model)
loop = BareLoop(lm, 20, cfg.trainer.gradient_clip_val)
B, T, V = cfg.data.batch_size, cfg.data.seq_len, lm.model.cfg.vocab_size
tokens = torch.randint(0, V, (8, B, T + 1))
cpu = []
for i, t in enumerate(tokens):
    c = time.process_time(); loop.step((t[:, :-1], t[:, 1:])); cpu.append(time.process_time() - c)
print(f"default shape (batch {B} x {T}, d={lm.model.cfg.d_model}, L={lm.model.cfg.n_layers}): "
      f"bare step CPU median {1e3 * statistics.median(cpu[2:]):.1f} ms over {len(cpu) - 2} steps")
