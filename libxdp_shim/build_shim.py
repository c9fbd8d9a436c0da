"""cffi build script for xdpguard._shim (out-of-line API mode).

The declarations fed to cdef() are sliced from the same headers the C code
and the BPF program compile against (the regions between ``cffi:begin`` and
``cffi:end``), so no struct is ever written twice.
"""

from __future__ import annotations

import re
from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parent.parent
SHIM = ROOT / "libxdp_shim"
BPF = ROOT / "bpf"

_REGION = re.compile(r"/\* cffi:begin \*/(.*?)/\* cffi:end \*/", re.S)

# Kernel integer types as cffi knows them (the headers use <linux/types.h>).
_KERNEL_TYPES = """
typedef uint8_t __u8;
typedef uint16_t __u16;
typedef uint32_t __u32;
typedef unsigned long long __u64;
typedef int32_t __s32;
typedef long long __s64;
typedef uint16_t __be16;
typedef uint32_t __be32;
"""

# The part of libbpf's stable API that Python calls directly: map access.
_LIBBPF = """
int bpf_map_lookup_elem(int fd, const void *key, void *value);
int bpf_map_update_elem(int fd, const void *key, const void *value,
                        uint64_t flags);
int bpf_map_delete_elem(int fd, const void *key);
int bpf_map_get_next_key(int fd, const void *key, void *next_key);
int bpf_obj_pin(int fd, const char *pathname);
int bpf_obj_get(const char *pathname);
int libbpf_num_possible_cpus(void);
int bpf_prog_get_fd_by_id(uint32_t id);
"""


def region(path: Path) -> str:
    """Return the cffi region of a header, refusing one with directives."""
    match = _REGION.search(path.read_text())
    if not match:
        raise RuntimeError(f"{path}: no cffi:begin/cffi:end region")
    text = match.group(1)
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            raise RuntimeError(f"{path}: preprocessor line in cffi region: {line!r}")
    return text


ffibuilder = FFI()
ffibuilder.cdef(_KERNEL_TYPES + region(BPF / "xdpguard.h") + region(SHIM / "xg_shim.h") + _LIBBPF)
ffibuilder.set_source_pkgconfig(
    "xdpguard._shim",
    ["libxdp", "libbpf"],
    '#include "xg_shim.h"\n#include <bpf/bpf.h>\n#include <bpf/libbpf.h>\n',
    sources=[str(p.relative_to(ROOT)) for p in sorted(SHIM.glob("*.c"))],
    include_dirs=[str(SHIM), str(BPF)],
    extra_compile_args=[
        "-O2",
        "-Wall",
        "-Wno-unused-function",
        "-Werror=implicit-function-declaration",
        "-std=gnu11",
    ],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
