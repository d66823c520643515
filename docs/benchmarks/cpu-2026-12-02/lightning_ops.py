"""aten ops per training step: Lightning's (default callbacks' hooks included) vs the BareLoop."""
import sys, collections, torch, lightning as L
from torch.utils.data import DataLoader
from torch.utils._python_dispatch import TorchDispatchMode
sys.path.insert(0, "scripts")
from spannorm.training.lm import LanguageModel
from spannorm.bench import BareLoop
torch.set_num_threads(1)
class C(TorchDispatchMode):
    def __init__(s): super().__init__(); s.c=collections.Counter()
    def __torch_dispatch__(s,f,t,a=(),k=None):
        s.c[f.overloadpacket.__name__]+=1; return f(*a,**(k or {}))
MODEL=dict(vocab_size=8192,d_model=128,n_layers=4,n_heads=4,max_seq_len=128)
g=torch.Generator().manual_seed(0)
tok=torch.randint(0,8192,(6,16,129),generator=g); data=[(t[:,:-1],t[:,1:]) for t in tok]
class Count(L.Callback):
    def __init__(s): s.counts=[]
    def on_train_batch_start(s,*a):
        s.mode=C(); s.mode.__enter__()
    def on_train_batch_end(s,*a):
        s.mode.__exit__(None,None,None); s.counts.append(s.mode.c)
torch.manual_seed(0); lm=LanguageModel(**MODEL)
cb=Count()
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
import os
with initialize_config_dir(config_dir=os.path.abspath("conf"), version_base="1.3"):
    cfg=compose("train", overrides=["trainer=cpu"] if False else [])
cbs=[instantiate(c) for k,c in cfg.callbacks.items() if c is not None and k not in ("checkpoint","progress","hparams","experts")]
tr=L.Trainer(accelerator="cpu",max_steps=6,gradient_clip_val=cfg.trainer.gradient_clip_val,logger=False,enable_checkpointing=False,enable_progress_bar=False,enable_model_summary=False,callbacks=[cb,*cbs])
tr.fit(lm, DataLoader(data,batch_size=None))
torch.manual_seed(0); loop=BareLoop(LanguageModel(**MODEL),6,cfg.trainer.gradient_clip_val)
bare=[]
for b in data:
    with C() as c: loop.step(b)
    bare.append(c.c)
lc, bc = cb.counts[3], bare[3]
print("callbacks:", [type(c).__name__ for c in cbs], "clip", cfg.trainer.gradient_clip_val)
print("lightning step 3 ops", sum(lc.values()), "bare", sum(bc.values()))
for k in sorted(set(lc)|set(bc), key=lambda k: -abs(lc[k]-bc[k])):
    if lc[k]!=bc[k]: print(f"  {k}: lightning {lc[k]} bare {bc[k]}")
