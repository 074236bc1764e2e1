import os as _os

# On a shared 2-core host, OpenBLAS's own threads measured up to 60x slower than one
# thread for the routing matrix-vector product (they spin waiting for each other). The
# variable only works if set before numpy loads OpenBLAS, hence here; an explicit value
# from the environment wins.
_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
