"""What a worker does before it is needed: imports, and lowering the thread that does them.

Contract: `warm_imports()` imports what a rank needs before its first step; `lower_this_thread()`
puts the calling thread (only) at idle priority, so a spare's warm-up runs on CPU time the ranks
leave unused.
"""

from __future__ import annotations

import os


def warm_imports() -> None:
    """What a rank needs before its first step, imported while nothing waits for it (warm
    spares)."""
    import peft  # noqa: F401
    import torch.distributed  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    import resilient.checkpoint.engine  # noqa: F401
    import resilient.training.trainer  # noqa: F401


def lower_this_thread() -> None:
    """SCHED_IDLE for the calling thread only (Linux: policy and niceness are per thread), so the
    thread that will train is never lowered (an unprivileged process could not raise it back)."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux: a plain nice
        try:
            os.nice(10)
        except OSError:
            pass
