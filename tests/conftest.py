import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# TFCOMPAT_WITHOUT_TF=1 runs the suite as if TensorFlow (and the Keras packages) were not
# installed: the tests that need them skip, the rest must pass (`make test-without-tf`).
if os.environ.get("TFCOMPAT_WITHOUT_TF"):
    for name in ("tensorflow", "tf_keras", "keras"):
        sys.modules[name] = None

# TFCOMPAT_WITHOUT_KERNEL=1 runs it as if the package had been installed where no C compiler
# was found (the sdist's optional extensions not built): CPU updates take the torch path, plans
# are checked in Python, the tests that need the compiled kernel skip, the rest must pass.
if os.environ.get("TFCOMPAT_WITHOUT_KERNEL"):
    sys.modules["tfcompat_ema._fused"] = None
    sys.modules["tfcompat_ema._data_pointers"] = None
