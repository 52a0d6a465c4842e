"""qlora: QLoRA fine-tuning with an NF4 base through bitsandbytes and LoRA factors."""

import os

__version__ = "0.1.0"

# torch's CPU allocator backs its blocks of 2 MB and more with transparent huge pages when
# this is set. It reads the variable once, at its first such allocation, so it is set on
# import (why: qlora/memory.py; figures: benchmarks/README.md, "Huge pages"). An explicit
# value in the environment, 0 included, wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
