from setuptools import setup

setup(cffi_modules=["libxdp_shim/build_shim.py:ffibuilder"])
