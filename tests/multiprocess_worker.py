"""One process of the two-process training check (tests/test_multiprocess.py): 4 CPU devices of an 8-device mesh.

    python tests/multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main(process_id: int, num_processes: int, port: int, out: str) -> None:
    from safety_jax.parallel import initialize_distributed

    initialize_distributed(coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
                           process_id=process_id)
    sys.path.insert(0, os.path.dirname(__file__))
    from multiprocess_run import run_training

    loaded = run_training(process_id, num_processes, out)
    with open(os.path.join(out, f"rows-{process_id}.json"), "w") as f:
        json.dump(loaded, f)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
