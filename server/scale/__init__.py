"""Scale-out: N engine replicas on Ray Serve (ray_serve.py, the [ray] extra) and how replicas announce
their state in the shared Redis (replicas.py)."""
