import time, jax, numpy as np
from aqgov.examples import efficacy as e, _efficacy_lm as lm
t=time.time()
rows = e.run_seed(0, 500, candidates=1000, variants=("control","filtered","routing"), depth=False, attack=True)
for k,v in rows.items(): print(k, {a:(round(b,3) if isinstance(b,float) else b) for a,b in v.items()})
print("total", time.time()-t)
