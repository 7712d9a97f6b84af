import numpy as np, onnxruntime as ort, time, sys
from onnx import helper as h, TensorProto as T
B,H,D,P=[int(x) for x in sys.argv[1:5]]; CAP=P+112
ins=[h.make_tensor_value_info(n,T.FLOAT,s) for n,s in (("q",[B,1,H*D]),("k",[B,1,H*D]),("v",[B,1,H*D]),("pk",[B,H,"c",D]),("pv",[B,H,"c",D]))]
ins+=[h.make_tensor_value_info("sk",T.INT32,[B]),h.make_tensor_value_info("tot",T.INT32,[]),h.make_tensor_value_info("bias",T.FLOAT,[B,H,1,P+1])]
n=h.make_node("GroupQueryAttention",["q","k","v","pk","pv","sk","tot","","","","bias"],["o","ok","ov"],domain="com.microsoft",num_heads=H,kv_num_heads=H,scale=1.0)
g=h.make_graph([n],"g",ins,[h.make_tensor_value_info("o",T.FLOAT,None),h.make_tensor_value_info("ok",T.FLOAT,[B,H,"c",D]),h.make_tensor_value_info("ov",T.FLOAT,[B,H,"c",D])])
m=h.make_model(g,opset_imports=[h.make_opsetid("",18),h.make_opsetid("com.microsoft",1)])
so=ort.SessionOptions(); so.intra_op_num_threads=2
s=ort.InferenceSession(m.SerializeToString(),so,providers=["CPUExecutionProvider"])
r=np.random.default_rng(0)
kbuf=ort.OrtValue.ortvalue_from_numpy(r.standard_normal((B,H,CAP,D)).astype(np.float32))
vbuf=ort.OrtValue.ortvalue_from_numpy(r.standard_normal((B,H,CAP,D)).astype(np.float32))
io=s.io_binding()
for nm in "qkv": io.bind_cpu_input(nm, r.standard_normal((B,1,H*D)).astype(np.float32))
io.bind_ortvalue_input("pk",kbuf); io.bind_ortvalue_input("pv",vbuf)
io.bind_cpu_input("sk",np.full(B,P,np.int32)); io.bind_cpu_input("tot",np.array(P+1,np.int32))
io.bind_cpu_input("bias",r.standard_normal((B,H,1,P+1)).astype(np.float32))
io.bind_output("o"); io.bind_ortvalue_output("ok",kbuf); io.bind_ortvalue_output("ov",vbuf)
ts=[]
for _ in range(7):
    t=time.perf_counter()
    for _ in range(20): s.run_with_iobinding(io)
    ts.append((time.perf_counter()-t)/20*1e3)
print("in place + bias: %.3f ms per layer call, B=%d H=%d D=%d past=%d"%(np.median(ts),B,H,D,P))
