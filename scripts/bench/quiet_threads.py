"""Imported first by the benchmark scripts: thread pools that sleep when idle instead of spinning.

On a machine shared with other processes a spinning worker holds a core the others need, and every parallel region
then waits for a descheduled thread (measured: a tiny PyTorch forward at 2 threads took 400 ms with OpenMP's default
spin-wait, 10 ms with PASSIVE). The variables are read when the libraries load, so this must run before anything
imports torch, jax or scipy; an explicit environment setting wins.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # OpenBLAS workers spin 2^4 cycles, not 2^28, before sleeping
