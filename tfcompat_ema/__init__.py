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
from .module import EMAModule

__all__ = ["AUTO", "EMAModule", "ExponentialMovingAverage"]
__version__ = "0.1.0"
