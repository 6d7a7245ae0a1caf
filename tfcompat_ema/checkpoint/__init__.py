"""TF checkpoints read and written without TensorFlow: numpy only, safe on hostile files.

One job per module:

- :mod:`.errors`: :class:`CheckpointError`, the one error a bad file gives.
- :mod:`.crc`: CRC-32C (google-crc32c when installed, a numpy fallback otherwise).
- :mod:`.proto`: the protobuf wire format, decoded and encoded by hand for the few messages used.
- :mod:`.snappy`: a snappy block decoder (and a small encoder, for tests and old-style tables).
- :mod:`.table`: the LevelDB-style sorted table of ``.index`` files (and V1 checkpoints).
- :mod:`.bundle`: V2 tensor bundles (``.index`` + ``.data-NNNNN-of-NNNNN``), read and written.
- :mod:`.object_graph`: TF2's ``TrackableObjectGraph``, decoded.
- :mod:`.v1`: legacy V1 ``SavedTensorSlices`` checkpoints, read.
- :mod:`.state`: the ``checkpoint`` state file and finding a checkpoint's prefix.

Nothing here imports TensorFlow or torch; :mod:`tfcompat_ema.tf_checkpoint` makes torch tensors.
"""
from .errors import CheckpointError

__all__ = ["CheckpointError"]
