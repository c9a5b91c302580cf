"""Few-shot tasks: sine waves, Omniglot, Mini-ImageNet and any folder of class folders.

Nothing is downloaded: every loader reads data the user already has and raises a
:class:`DatasetError` naming the path and what was expected when it cannot.
"""

from .errors import DatasetError
from .folder import load_folder
from .images import ImageClasses, load_image
from .miniimagenet import load_miniimagenet
from .omniglot import load_omniglot
from .sampler import Task, TaskSampler, check_enough, inner_batches
from .sine import SineTask, SineTasks

__all__ = [
    "DatasetError",
    "ImageClasses",
    "SineTask",
    "SineTasks",
    "Task",
    "TaskSampler",
    "check_enough",
    "inner_batches",
    "load_folder",
    "load_image",
    "load_miniimagenet",
    "load_omniglot",
]
