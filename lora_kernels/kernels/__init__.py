"""Triton kernels (lowest layer). Nothing here checks arguments: ``lora_kernels.ops`` does."""
import re

import triton

# The launchers use triton.knobs and triton.tools.tensor_descriptor, which triton 3.4 introduced
# (pyproject.toml's floor): an older triton would fail later, inside an import of triton's, with a
# message that names neither lora_kernels nor the version it needs.
MIN_TRITON = (3, 4)


def major_minor(version: str) -> tuple:
    """(major, minor) of a version string such as "3.4.0", "3.6.0+git1a2b3c" or "2.9.1+cu128"."""
    found = re.match(r"(\d+)\.(\d+)", version)
    if not found:
        raise ImportError(f"lora_kernels: cannot read the version {version!r}")
    return int(found.group(1)), int(found.group(2))


if major_minor(triton.__version__) < MIN_TRITON:
    raise ImportError(f"lora_kernels needs triton >= {'.'.join(map(str, MIN_TRITON))} (with torch >= 2.8), "
                      f"found triton {triton.__version__}: pip install -U 'triton>={'.'.join(map(str, MIN_TRITON))}'")
