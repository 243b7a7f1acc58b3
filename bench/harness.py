"""The benchmarks' harness: :mod:`diffrt.runtime.harness` (it moved there so that ``diffrt bench`` has it)."""
from diffrt.runtime.harness import *  # noqa: F401,F403 - re-exported for the scripts in bench/
