import statistics, sys, time, torch
torch.set_num_threads(1)
B,H,T,hd=8,4,256,64; h=hd//2
torch.manual_seed(0)
base=torch.randn(B,T,3,H,hd)
def tables(start,length):
    inv=10000.0**(-torch.arange(0,hd,2,dtype=torch.float32)/hd)
    a=torch.outer(torch.arange(start,start+length,dtype=torch.float32),inv); return a.cos(),a.sin()
c,s=tables(0,T); C2=torch.cat((c,c),-1); S2=torch.cat((-s,s),-1)
def rot(x):
    x1,x2=x.chunk(2,-1); return torch.cat((x1*c-x2*s,x1*s+x2*c),-1)
def rot4(x):
    x1,x2=x.chunk(2,-1); return x*C2+torch.cat((x2,x1),-1)*S2
def rotate_into(x, c, s):
    x1,x2=x.chunk(2,-1); out=torch.empty(x.shape,dtype=x.dtype)
    o1,o2=out.chunk(2,-1)
    torch.mul(x1,c,out=o1); o1.sub_(x2*s)
    torch.mul(x1,s,out=o2); o2.add_(x2*c)
    return out
class Rot(torch.autograd.Function):
    @staticmethod
    def forward(ctx,x,c,s):
        ctx.save_for_backward(c,s); return rotate_into(x,c,s)
    @staticmethod
    def backward(ctx,g):
        c,s=ctx.saved_tensors; return rotate_into(g,c,-s),None,None
def rotf(x): return Rot.apply(x,c,s)
def learned():  # learned positions: the cost they replace (embedding + add, once per model)
    pass
ref=None; gq=torch.randn(B,H,T,hd)
def run(f):
    x=base.clone().requires_grad_()
    q,k,v=x.permute(2,0,3,1,4)
    y=(f(q),f(k)); gx,=torch.autograd.grad(y,(x,),(gq,gq)); return (*y,gx)
for n,f in (('rot',rot),('rot4',rot4),('rotf',rotf)):
    out=run(f)
    if ref is None: ref=out
    print(n, [torch.equal(a,b) for a,b in zip(ref,out)])
res={n:[] for n in ('rot','rot4','rotf')}
for r in range(int(sys.argv[1])):
    for n,f in (('rot',rot),('rot4',rot4),('rotf',rotf)):
        ts=[]
        for _ in range(5):
            t=time.thread_time(); run(f); ts.append(time.thread_time()-t)
        res[n].append(statistics.median(ts))
# the run() overhead: clone + permute + grad of an identity
def ident(x): return x*1
for n in res: print(n, f"{1e3*statistics.median(res[n]):.2f} ms per layer (q and k, fwd+bwd, incl. a clone)", f"{statistics.median(a/b for a,b in zip(res[n],res['rot'])):.3f}")
