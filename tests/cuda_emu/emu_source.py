"""A csrc/cuda/*.cu file as host C++ for the emulation (cuda_emu.h): launches become emu::launch calls.

    python tests/cuda_emu/emu_source.py csrc/cuda/soft_embed.cu OUT.cpp

`kernel<<<grid, block[, smem[, stream]]>>>(args);` -> `::emu::launch(grid, block, smem, stream)([&] { kernel(args); });`
`extern __shared__ T name[];` -> `T* name = static_cast<T*>(::emu::dyn_smem());`
`#include "../x.h"` / `"cuda_common.cuh"` -> found through -Icsrc / -Icsrc/cuda.
"""
from __future__ import annotations

import re
import sys


def _match_back(text: str, end: int) -> int:
    """Start of the kernel expression that ends at text[end - 1]: an identifier with optional <...> args."""
    i = end
    if text[i - 1] == ">":
        depth = 0
        while True:
            i -= 1
            depth += {">": 1, "<": -1}.get(text[i], 0)
            if depth == 0:
                break
    while i > 0 and (text[i - 1].isalnum() or text[i - 1] in "_:"):
        i -= 1
    return i


def _match_paren(text: str, start: int) -> int:
    """Index just past the ')' that closes the '(' at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    raise ValueError("unbalanced parentheses after a launch")


def rewrite(text: str) -> str:
    text = re.sub(r'#include "\.\./([^"]+)"', r'#include "\1"', text)
    text = re.sub(r"extern\s+__shared__\s+([\w:]+)\s+(\w+)\s*\[\s*\]\s*;",
                  r"\1* \2 = static_cast<\1*>(::emu::dyn_smem());", text)
    out, pos = [], 0
    while (at := text.find("<<<", pos)) >= 0:
        k0 = _match_back(text, at)
        close = text.index(">>>", at)
        cfg = text[at + 3:close]
        p0 = text.index("(", close)
        p1 = _match_paren(text, p0)
        out.append(text[pos:k0])
        out.append(f"::emu::launch({cfg})([&] {{ {text[k0:at]}{text[p0:p1]}; }})")
        pos = p1
    out.append(text[pos:])
    return "".join(out)


if __name__ == "__main__":
    src, dst = sys.argv[1], sys.argv[2]
    with open(src) as f:
        text = f.read()
    with open(dst, "w") as f:
        f.write(rewrite(text))
