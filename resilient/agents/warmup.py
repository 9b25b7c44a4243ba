"""What a worker does before it is needed: the imports.

Contract: `warm_imports()` imports what a rank needs before its first step (a spare does so on a
thread at idle priority: agents.priority).
"""

from __future__ import annotations


def warm_imports() -> None:
    """What a rank needs before its first step, imported while nothing waits for it (warm
    spares)."""
    import peft  # noqa: F401
    import torch.distributed  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    import resilient.checkpoint.engine  # noqa: F401
    import resilient.training.trainer  # noqa: F401
