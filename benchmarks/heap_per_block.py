"""Print RSS and glibc heap statistics after every decoder block of a real `msmodelslim quant` run (by hand).

    python benchmarks/heap_per_block.py quant --model_path ~/.cache/msmodelslim/synthetic/llama-1.5b-bf16 \
        --save_path /tmp/heap-out --device cpu --model_type Llama-2-7B --config_path w8a8_static.yaml --overwrite

Everything after the script name is the CLI's own arguments. After each block is released we print the process
RSS and `mallinfo2`: heap bytes in use, heap bytes free but kept, and bytes in separate mappings. A heap whose
free part grows block after block is fragmentation (docs/benchmarks.md, "Larger than memory"). glibc only.
"""
from __future__ import annotations

import ctypes
import sys
import time


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def rss_mib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) // 1024


def main() -> int:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    from msmodelslim.cli.__main__ import main as cli_main
    from msmodelslim.model.transformers_model import TransformersModel

    release = TransformersModel.release_block
    started = time.perf_counter()

    def release_and_report(self, model, name):
        release(self, model, name)
        info = libc.mallinfo2()
        print(f"{time.perf_counter() - started:7.1f} s {name}: RSS {rss_mib()} MiB, heap {info.arena >> 20} MiB "
              f"(in use {info.uordblks >> 20}, free {info.fordblks >> 20}), mmapped {info.hblkhd >> 20} MiB",
              file=sys.stderr, flush=True)

    TransformersModel.release_block = release_and_report
    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
