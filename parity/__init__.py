"""The parity suite: TensorFlow and tfcompat_ema side by side (`python -m parity`)."""
