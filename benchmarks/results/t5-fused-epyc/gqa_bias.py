import numpy as np, onnxruntime as ort, time
from onnx import helper as h, TensorProto as T
import sys
B,H,D,P=[int(x) for x in sys.argv[1:5]]
def gqa(bias):
    ins=[h.make_tensor_value_info(n,T.FLOAT,s) for n,s in (("q",[B,1,H*D]),("k",[B,1,H*D]),("v",[B,1,H*D]),("pk",[B,H,P,D]),("pv",[B,H,P,D]))]
    ins+=[h.make_tensor_value_info("sk",T.INT32,[B]),h.make_tensor_value_info("tot",T.INT32,[])]
    inputs=["q","k","v","pk","pv","sk","tot","","",""]
    if bias:
        ins.append(h.make_tensor_value_info("bias",T.FLOAT,[B,H,1,P+1])); inputs.append("bias")
    n=h.make_node("GroupQueryAttention",inputs,["o","ok","ov"],domain="com.microsoft",num_heads=H,kv_num_heads=H,scale=1.0)
    g=h.make_graph([n],"g",ins,[h.make_tensor_value_info(x,T.FLOAT,None) for x in ("o","ok","ov")])
    return h.make_model(g,opset_imports=[h.make_opsetid("",18),h.make_opsetid("com.microsoft",1)])
def std():
    # q,k,v already BNSH; concat + matmul + add bias + softmax + matmul
    ins=[h.make_tensor_value_info(n,T.FLOAT,s) for n,s in (("q",[B,H,1,D]),("k",[B,H,1,D]),("v",[B,H,1,D]),("pk",[B,H,P,D]),("pv",[B,H,P,D]),("bias",[B,H,1,P+1]))]
    nodes=[h.make_node("Concat",["pk","k"],["ok"],axis=2),h.make_node("Concat",["pv","v"],["ov"],axis=2),
           h.make_node("Transpose",["ok"],["kt"],perm=[0,1,3,2]),h.make_node("MatMul",["q","kt"],["s"]),
           h.make_node("Add",["s","bias"],["sb"]),h.make_node("Softmax",["sb"],["p"],axis=-1),h.make_node("MatMul",["p","ov"],["o"])]
    g=h.make_graph(nodes,"g",ins,[h.make_tensor_value_info(x,T.FLOAT,None) for x in ("o","ok","ov")])
    return h.make_model(g,opset_imports=[h.make_opsetid("",18)])
so=ort.SessionOptions(); so.intra_op_num_threads=2
S={k:ort.InferenceSession(m.SerializeToString(),so,providers=["CPUExecutionProvider"]) for k,m in (("gqa",gqa(False)),("gqa+bias",gqa(True)),("std",std()))}
r=np.random.default_rng(0)
f3={n:r.standard_normal((B,1,H*D)).astype(np.float32) for n in "qkv"}
past={"pk":r.standard_normal((B,H,P,D)).astype(np.float32),"pv":r.standard_normal((B,H,P,D)).astype(np.float32)}
bias=r.standard_normal((B,H,1,P+1)).astype(np.float32)
feeds={"gqa":{**f3,**past,"sk":np.full(B,P,np.int32),"tot":np.array(P+1,np.int32)}}
feeds["gqa+bias"]={**feeds["gqa"],"bias":bias}
feeds["std"]={**{n:v.reshape(B,1,H,D).transpose(0,2,1,3).copy() for n,v in f3.items()},**past,"bias":bias}
res={k:[] for k in S}
for _ in range(7):
    for k,s in S.items():
        t=time.perf_counter()
        for _ in range(20): s.run(None,feeds[k])
        res[k].append((time.perf_counter()-t)/20*1e3)
print({k:round(float(np.median(v)),3) for k,v in res.items()}, "ms per layer call, B=%d H=%d D=%d past=%d"%(B,H,D,P))
