"""qkernels benchmarks: one script per op on one harness (``_harness``); results in ``benchmarks/results/``.

Every script runs with ``OMP_WAIT_POLICY=active`` unless the caller set it: set here, before any script imports
torch (which loads the OpenMP runtime that torch, bitsandbytes' CPU path and qkernels' kernels share). With the
default passive policy an idle OpenMP worker goes to sleep, and on the 2-core VM the benchmarks run on, waking it
took up to a 4 ms scheduler tick: the M = 16 GEMV measured 2.5 ms with spinning workers and 4.2 ms in runs where
they had slept, and dense torch matmuls jumped the same way. Spinning workers measure the kernels, not the VM's
wake-up latency; every implementation in a table runs under the same policy, and ``machine_info`` records it.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "active")
