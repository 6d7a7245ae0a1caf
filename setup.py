"""Builds the optional fused CPU kernel; without a C compiler the package still installs and
uses its exact pure-PyTorch path."""
import sys

from setuptools import Extension, setup

if sys.platform == "win32":
    # No POSIX threads there: the kernel runs on the caller's thread (see _fused.c).
    compile_args, link_args = ["/O2", "/fp:precise"], []
else:
    # -ffp-contract=off: no fused multiply-add, TF rounds the multiply and the subtract apart.
    compile_args = ["-O3", "-fno-fast-math", "-ffp-contract=off", "-pthread"]
    link_args = ["-pthread"]
    if sys.platform.startswith("linux"):
        # OpenMP on torch's runtime: -fopenmp to compile, but no runtime linked (no -fopenmp,
        # no -lgomp at link time): the GOMP calls resolve at import to the libgomp torch has
        # loaded globally, so the wheel bundles no second runtime (see _fused.c, run_split).
        compile_args.append("-fopenmp")

# The per-step check that a cached plan's pointers still hold (see _data_pointers.cpp): C++
# for its try/catch, linked to nothing of torch's. Optional too: without it the check runs in
# Python, slower.
pointer_args = ["/O2", "/EHsc"] if sys.platform == "win32" else ["-O2"]

setup(ext_modules=[Extension("tfcompat_ema._fused", ["tfcompat_ema/_fused.c"],
                             extra_compile_args=compile_args, extra_link_args=link_args,
                             optional=True),
                   Extension("tfcompat_ema._data_pointers", ["tfcompat_ema/_data_pointers.cpp"],
                             extra_compile_args=pointer_args, language="c++", optional=True)])
