"""A torchrun entry for tests/backends/torch/test_ddp.py: `mixc ...`, then record which native
threads outlive it.

After `mixc train` returns, destroy_process_group must have freed the process
group: no gloo thread may run on into interpreter shutdown, where tearing it
down can abort the rank ("terminate called without an active exception").
"""

import os
import sys
from pathlib import Path


def native_threads() -> list[str]:
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            names.append(Path(f"/proc/self/task/{tid}/comm").read_text().strip())
        except OSError:
            pass
    return sorted(names)


if __name__ == "__main__":
    from mixc.cli import main

    code = main(sys.argv[1:])
    out = os.environ.get("MIXC_THREADS_DIR")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, f"rank{os.environ.get('RANK', '0')}.threads").write_text(
            "\n".join(native_threads()) + "\n"
        )
    raise SystemExit(code)
