"""Per-step overhead of Lightning (default callbacks, progress bar) vs BareLoop on a tiny model."""
import os, sys, time, statistics, torch, lightning as L
from torch.utils.data import DataLoader
from spannorm.training.lm import LanguageModel
from spannorm.bench import BareLoop, quiet_lightning
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
torch.set_num_threads(1); quiet_lightning()
if os.environ.get("NOLOG"): LanguageModel.log = lambda self, *a, **k: None
MODEL=dict(vocab_size=16,d_model=8,n_layers=1,n_heads=1,max_seq_len=8)
N=int(sys.argv[1]); bar = len(sys.argv) > 2
tok=torch.randint(0,16,(N+10,1,9)); data=[(t[:,:-1],t[:,1:]) for t in tok]
with initialize_config_dir(config_dir=os.path.abspath("conf"), version_base="1.3"):
    cfg=compose("train")
class Clock(L.Callback):
    def __init__(s): s.ends=[]; s.cpu=[]
    def on_train_batch_end(s,*a): s.ends.append(time.perf_counter()); s.cpu.append(time.process_time())
clock=Clock()
cbs=[instantiate(c) for k,c in cfg.callbacks.items() if c is not None and k not in ("checkpoint","experts","hparams", *os.environ.get("SKIP","").split(",")) and (bar or k!="progress")]
tr=L.Trainer(accelerator="cpu",max_steps=N,gradient_clip_val=1.0,logger=False,enable_checkpointing=False,enable_progress_bar=bar,enable_model_summary=False,callbacks=[clock,*cbs])
tr.fit(LanguageModel(**MODEL, optim=OmegaConf.to_container(cfg.optim)), DataLoader(data,batch_size=None))
lw=[b-a for a,b in zip(clock.ends[10:],clock.ends[11:])]; lc=[b-a for a,b in zip(clock.cpu[10:],clock.cpu[11:])]
loop=BareLoop(LanguageModel(**MODEL, optim=OmegaConf.to_container(cfg.optim)),N,1.0); it=iter(DataLoader(data,batch_size=None))
bw,bc=[],[]
for i in range(N):
    w,c=time.perf_counter(),time.process_time(); loop.step(next(it)); bw.append(time.perf_counter()-w); bc.append(time.process_time()-c)
bw,bc=bw[10:],bc[10:]
print("callbacks", [type(c).__name__ for c in cbs])
print(f"lightning step: wall median {1e3*statistics.median(lw):.2f} ms, cpu mean {1e3*statistics.mean(lc):.2f} median {1e3*statistics.median(lc):.2f} ms")
print(f"bare step:      wall median {1e3*statistics.median(bw):.2f} ms, cpu mean {1e3*statistics.mean(bc):.2f} median {1e3*statistics.median(bc):.2f} ms")
