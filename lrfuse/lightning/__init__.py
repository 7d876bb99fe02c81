"""Lightning integration: the LRFinder, LRSchedule and LRHealthMonitor callbacks, the demo, the CLI.

Lightning is imported only under this package; ``import lrfuse`` stays free of it.
"""

from lrfuse.lightning.finder import LRFinder, apply_lr, find_lr
from lrfuse.lightning.health import LRHealthMonitor
from lrfuse.lightning.schedule import LRSchedule

__all__ = ["LRFinder", "LRHealthMonitor", "LRSchedule", "apply_lr", "find_lr"]
