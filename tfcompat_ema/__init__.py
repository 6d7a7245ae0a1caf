"""TensorFlow's ``tf.train.ExponentialMovingAverage`` on PyTorch, bit for bit.

>>> import torch
>>> from tfcompat_ema import ExponentialMovingAverage
>>> ema = ExponentialMovingAverage(0.999, num_updates="auto")
>>> w = torch.zeros(3)
>>> ema.apply({"w": w})
>>> ema.average_name("w")
'w/ExponentialMovingAverage'
"""
from .ema import AUTO, ExponentialMovingAverage
from .keras_ema import KerasEMA
from .kernels import fused_available
from .module import EMAModule
from .name_map import MappingError, NameMap, Report, Rule
from .tf_checkpoint import CheckpointError, TFCheckpoint, read_checkpoint, write_checkpoint

__all__ = ["AUTO", "EMAModule", "ExponentialMovingAverage", "KerasEMA", "fused_available",
           "NameMap", "Rule", "Report", "MappingError",
           "read_checkpoint", "write_checkpoint", "TFCheckpoint", "CheckpointError"]
__version__ = "0.1.0"
