import numpy as np
def p_mse(a,b): return float(np.mean((a-b)**2))
