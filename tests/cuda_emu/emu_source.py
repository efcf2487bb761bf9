"""A csrc/cuda/*.cu file as host C++ for the emulation (cuda_emu.h): launches become emu::launch calls.

    python tests/cuda_emu/emu_source.py csrc/cuda/soft_embed.cu OUT.cpp

`kernel<<<grid, block[, smem[, stream]]>>>(args);`
    -> `::emu::launch(grid, block, smem, stream)("kernel", __FILE__, __LINE__, [&] { kernel(args); });`
`reinterpret_cast<T>(e)` -> `::emu::checked_cast<T>((e), __FILE__, __LINE__, __func__)` (alignment checked)
`extern __shared__ T name[];` -> `T* name = static_cast<T*>(::emu::dyn_smem());`
`#include "../x.h"` / `"cuda_common.cuh"` -> found through -Icsrc / -Icsrc/cuda.
A `#line 1 "<the .cu file>"` first, and no line added or removed: messages and compile errors name the .cu
file and its own line numbers.
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


def _match(text: str, start: int, pair: str, what: str) -> int:
    """Index just past the closing bracket of ``pair`` ("()" or "<>") that matches the one at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        depth += {pair[0]: 1, pair[1]: -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    raise ValueError(f"unbalanced {pair[0]}...{pair[1]} after {what}")


def _match_paren(text: str, start: int) -> int:
    """Index just past the ')' that closes the '(' at text[start]."""
    return _match(text, start, "()", "a launch")


def _match_angle(text: str, start: int) -> int:
    """Index just past the '>' that closes the '<' at text[start]."""
    return _match(text, start, "<>", "a reinterpret_cast")


def _checked_casts(text: str) -> str:
    out, pos = [], 0
    while (at := text.find("reinterpret_cast<", pos)) >= 0:
        t1 = _match_angle(text, at + len("reinterpret_cast"))
        p0 = t1 + len(text[t1:]) - len(text[t1:].lstrip())
        assert text[p0] == "(", f"reinterpret_cast without (...) at {text[at:at + 60]!r}"
        p1 = _match_paren(text, p0)
        out.append(text[pos:at])
        out.append(f"::emu::checked_cast{text[at + len('reinterpret_cast'):t1]}({text[p0:p1]}, __FILE__, __LINE__, "
                   "__func__)")
        pos = p1
    out.append(text[pos:])
    return "".join(out)


def rewrite(text: str, path: str = "") -> str:
    text = re.sub(r'#include "\.\./([^"]+)"', r'#include "\1"', text)
    text = re.sub(r"extern\s+__shared__\s+([\w:]+)\s+(\w+)\s*\[\s*\]\s*;",
                  r"\1* \2 = static_cast<\1*>(::emu::dyn_smem());", text)
    text = _checked_casts(text)
    out, pos = ([f'#line 1 "{path}"\n'] if path else []), 0
    while (at := text.find("<<<", pos)) >= 0:
        k0 = _match_back(text, at)
        close = text.index(">>>", at)
        cfg = text[at + 3:close]
        p0 = text.index("(", close)
        p1 = _match_paren(text, p0)
        out.append(text[pos:k0])
        name = " ".join(text[k0:at].split())
        out.append(f'::emu::launch({cfg})("{name}", __FILE__, __LINE__, [&] {{ {text[k0:at]}{text[p0:p1]}; }})')
        pos = p1
    out.append(text[pos:])
    return "".join(out)


if __name__ == "__main__":
    src, dst = sys.argv[1], sys.argv[2]
    with open(src) as f:
        text = f.read()
    with open(dst, "w") as f:
        f.write(rewrite(text, src))
