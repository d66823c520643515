import statistics, sys, time, torch, torch.nn.functional as F
torch.set_num_threads(1)
B,T,D,H=8,256,256,4; hd=D//H
torch.manual_seed(0)
x=torch.randn(B,T,D,requires_grad=True)
Wqkv=(torch.randn(3*D,D)*0.02).requires_grad_(); Wp=(torch.randn(D,D)*0.02).requires_grad_()
g=torch.randn(B,T,D)
def tables(start,length):
    inv=10000.0**(-torch.arange(0,hd,2,dtype=torch.float32)/hd)
    a=torch.outer(torch.arange(start,start+length,dtype=torch.float32),inv); return a.cos(),a.sin()
COS,SIN=tables(0,1024)
def rot(x,c,s):
    x1,x2=x.chunk(2,-1); return torch.cat((x1*c-x2*s,x1*s+x2*c),-1)
C2=torch.cat((COS,COS),-1); S2=torch.cat((-SIN,SIN),-1)
def rot4(x,c2,s2):
    x1,x2=x.chunk(2,-1); return x*c2+torch.cat((x2,x1),-1)*s2
def old(x, cached=False, split=False, r=rot):
    q=F.linear(x,Wqkv)
    if split:
        q,k,v=(t.view(B,T,H,hd).transpose(1,2) for t in q.split(D,-1))
    else:
        q,k,v=q.view(B,T,3,H,hd).permute(2,0,3,1,4)
    if r is rot4: c,s=C2[:T],S2[:T]
    elif cached: c,s=COS[:T],SIN[:T]
    else: c,s=tables(0,T)
    q,k=r(q,c,s),r(k,c,s)
    y=F.scaled_dot_product_attention(q,k,v,is_causal=True)
    return F.linear(y.transpose(1,2).reshape(B,T,D),Wp)
def qk_together(x):
    out=F.linear(x,Wqkv)
    qk=out[...,:2*D].view(B,T,2,H,hd)
    v=out[...,2*D:].view(B,T,H,hd).transpose(1,2)
    c,s=COS[:T].view(T,1,1,hd//2),SIN[:T].view(T,1,1,hd//2)
    q,k=(t.transpose(1,2) for t in rot(qk,c,s).unbind(2))
    y=F.scaled_dot_product_attention(q,k,v,is_causal=True)
    return F.linear(y.transpose(1,2).reshape(B,T,D),Wp)
def minimal(x, rope=False):
    q,k,v=F.linear(x,Wqkv).split(D,2)
    q,k,v=(t.view(B,T,H,hd).transpose(1,2) for t in (q,k,v))
    if rope:
        c,s=C2[:T],torch.cat((SIN,SIN),-1)[:T]
        def rh(t):
            a,b=t.chunk(2,-1); return t*c+torch.cat((-b,a),-1)*s
        q,k=rh(q),rh(k)
    y=F.scaled_dot_product_attention(q,k,v,is_causal=True)
    return F.linear(y.transpose(1,2).contiguous().view(B,T,D),Wp)
V={'old':lambda:old(x),'cached':lambda:old(x,True),'cached+split':lambda:old(x,True,True),
   'cached+split+rot4':lambda:old(x,True,True,rot4),'qk_together':lambda:qk_together(x),
   'minimal rope':lambda:minimal(x,True),'minimal':lambda:minimal(x)}
ref=None
for n,f in V.items():
    y=f(); gr=torch.autograd.grad(y,(x,Wqkv,Wp),g)
    if ref is None: ref=(y,*gr)
    print(n,'identical to old:',all(torch.equal(a,b) for a,b in zip(ref,(y,*gr))))
res={n:[] for n in V}
for r in range(int(sys.argv[1]) if len(sys.argv)>1 else 7):
    for n,f in V.items():
        ts=[]
        for _ in range(3):
            t=time.thread_time(); y=f(); torch.autograd.grad(y,(x,Wqkv,Wp),g); ts.append(time.thread_time()-t)
        res[n].append(statistics.median(ts))
for n in V:
    print(f'{n:20s} {1e3*statistics.median(res[n]):7.2f} ms  ratio to old {statistics.median(a/b for a,b in zip(res[n],res["old"])):.3f}')
