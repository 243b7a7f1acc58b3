from setuptools import setup

setup(
    name="diffrt",
    version="0.1.0",
    packages=["diffrt.runtime", "diffrt.runtime.solvers", "diffrt.kernels", "diffrt.export"],
    package_dir={"diffrt.runtime": "runtime", "diffrt.kernels": "kernels", "diffrt.export": "export"},
)
