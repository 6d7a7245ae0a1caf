"""Builds the optional fused CPU kernel; without a C compiler the package still installs and
uses its exact pure-PyTorch path."""
import sys

from setuptools import Extension, setup

if sys.platform == "win32":
    compile_args, link_args = ["/O2", "/fp:precise", "/openmp"], []
else:
    # -ffp-contract=off: no fused multiply-add, TF rounds the multiply and the subtract apart.
    compile_args = ["-O3", "-fno-fast-math", "-ffp-contract=off", "-fopenmp"]
    link_args = ["-fopenmp"]

setup(ext_modules=[Extension("tfcompat_ema._fused", ["tfcompat_ema/_fused.c"],
                             extra_compile_args=compile_args, extra_link_args=link_args,
                             optional=True)])
