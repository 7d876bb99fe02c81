"""lrfuse: fused per-group learning-rate optimizers and LR tools for PyTorch Lightning."""

from lrfuse.optim import FusedAdadelta, FusedAdagrad, FusedAdam, FusedAdamW, FusedRMSprop, FusedSGD

__all__ = [
    "FusedAdam", "FusedAdamW", "FusedRMSprop", "FusedSGD", "FusedAdagrad", "FusedAdadelta",
    "LRFinder", "LRHealthMonitor", "LRSchedule", "find_lr", "search_lr",
    "discriminative_groups", "layerwise_groups",
]
__version__ = "0.1.0"

# Resolved on first use, so that `import lrfuse` imports neither Lightning nor the helpers.
_LAZY = {
    "LRFinder": "lrfuse.lightning.finder",
    "find_lr": "lrfuse.lightning.finder",
    "search_lr": "lrfuse.lightning.search",  # Ray itself is imported only when a search starts
    "LRSchedule": "lrfuse.lightning.schedule",
    "LRHealthMonitor": "lrfuse.lightning.health",
    "layerwise_groups": "lrfuse.groups",
    "discriminative_groups": "lrfuse.groups",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lrfuse' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
