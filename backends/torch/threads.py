"""Apply mixc's thread count to torch (``mixc.core.threads`` decides the number)."""

from __future__ import annotations

import torch

__all__ = ["set_threads"]


def set_threads(n: int) -> dict[str, object]:
    """Intra-op threads ``n``; inter-op threads min(n, 2) where torch still allows setting them
    (only before the first parallel op of the process). Returns what was set, for config.json."""
    torch.set_num_threads(n)
    interop: int | str = min(n, 2)
    try:
        torch.set_num_interop_threads(interop)
    except RuntimeError:  # already fixed by earlier parallel work in this process
        interop = f"{torch.get_num_interop_threads()} (fixed earlier)"
    return {"threads": torch.get_num_threads(), "interop_threads": interop}
