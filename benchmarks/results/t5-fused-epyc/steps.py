"""One decode step: BUILD (self-attention fused) vs BUILD-old (attention pass off, as T5 got before),
both on the growing (copying) KV cache, alternating, at synthetic past lengths."""
import numpy as np, sys, os
from vlm_export.runtime.load import open_build
from vlm_export.bench import measure
b = sys.argv[1]
pipes = {"before": open_build(b + "-old", check_hashes=False), "now": open_build(b)}
print({k: p.kv_in_place for k, p in pipes.items()}, "load", os.getloadavg(), flush=True)
for past in (100, 400):
    for rows in (1, 4):
        fns = {}
        for name, pipe in pipes.items():
            state = {"batch": pipe.running(pipe.scheme.synthetic_batch(rows, past, np.random.default_rng(0)), [past + 100] * rows)}
            def step(state=state, pipe=pipe, rows=rows):
                _, state["batch"] = pipe.step(state["batch"], np.zeros(rows, np.int64))
            fns[name] = measure.timed(step)
        res = measure.alternating(fns, warmup=3, n=20)
        p50 = {k: float(np.median([w for w, _ in v] if isinstance(v[0], tuple) else v)) for k, v in res.items()}
        print(past, rows, {k: round(v * 1000 if v < 1 else v, 2) for k, v in p50.items()},
              "before/now %.2f" % (p50["before"] / p50["now"]), flush=True)
print("load", os.getloadavg(), flush=True)
