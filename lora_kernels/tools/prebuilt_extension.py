"""A ``lora_kernels._C`` built on the CPU machine for the lent GPU machine, carried there in ``.whl/``
instead of compiled there.

A GPU session gets one ~570 s call; compiling csrc/ in it took 139 s (one file, H200 run 1) and still
takes a minute or more in 15 files. The CPU machine has nvcc 13.0 and can install the GPU machine's
torch wheel (2.11.0+cu130, Python 3.12), so it can build and link the same extension (not run it):
``benchmarks/prebuild_device_extension.sh`` does, then ``pack`` writes into ``.whl/``

    lora_kernels_C.so.xz   the extension, host debug info stripped, xz-compressed (~2.5 MB for sm_90)
    lora_kernels_C.json    what it was built from and for: the digest of csrc/'s sources and build
                           flags (csrc/build_flags.py: source_digest), the torch version, the
                           architectures, its file name (the Python ABI tag), the commit

and benchmarks/run_device.sh's ``build`` step calls ``unpack``, which installs it into lora_kernels/
only when the sources, torch and Python match and the GPU is one the SASS runs on; otherwise it says
what differs and the step compiles csrc/ as before (also when the installed file does not load).

    python -m lora_kernels.tools.prebuilt_extension pack --so PATH --root BUILT_TREE --archs 90 [--dest .whl]
    python -m lora_kernels.tools.prebuilt_extension unpack [--src .whl]     # exit 0: installed
"""
import argparse
import datetime
import importlib.machinery
import json
import lzma
import os
import shutil
import subprocess
import sys
import tempfile

from lora_kernels.tools.csrc_check import BUILD_FLAGS, REPO_ROOT

PACKED_NAME = "lora_kernels_C.so.xz"
META_NAME = "lora_kernels_C.json"


def extension_file_name() -> str:
    """The file name this Python imports ``lora_kernels._C`` from (``_C.cpython-312-x86_64-linux-gnu.so``)."""
    return "_C" + importlib.machinery.EXTENSION_SUFFIXES[0]


def _commit(root: str) -> str:
    """The commit of the repository at ``root`` ("-dirty" with uncommitted changes), for the record;
    what decides is the digest."""
    try:
        return subprocess.run(["git", "-C", root, "describe", "--always", "--dirty"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def pack(so_path: str, root: str, archs: list, dest: str, strip: bool = True) -> dict:
    """Write ``so_path`` (a build of the tree at ``root`` for ``archs``, by this Python's torch) as
    PACKED_NAME and its META_NAME into ``dest``; returns the metadata. ``strip`` drops host debug info
    (the cubins and their -lineinfo stay)."""
    import torch

    if not os.path.isfile(so_path):
        raise FileNotFoundError(f"so_path: no file {so_path}")
    if os.path.basename(so_path) != extension_file_name():
        raise ValueError(f"so_path: expected a file named {extension_file_name()} (this Python's "
                         f"extension suffix), got {os.path.basename(so_path)}")
    if torch.version.cuda is None:
        raise ValueError(f"torch {torch.__version__} is not a CUDA build: it cannot have built {so_path}")
    archs = BUILD_FLAGS.cuda_archs(" ".join(str(a) for a in archs))
    os.makedirs(dest, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, os.path.basename(so_path))
        shutil.copyfile(so_path, copy)
        if strip:
            subprocess.run(["strip", "--strip-debug", copy], check=True)
        with open(copy, "rb") as f:
            data = f.read()
    with lzma.open(os.path.join(dest, PACKED_NAME), "wb", preset=9) as f:
        f.write(data)
    meta = {"file": os.path.basename(so_path), "bytes": len(data), "digest": BUILD_FLAGS.source_digest(root),
            "torch": torch.__version__, "cuda": torch.version.cuda, "archs": archs, "commit": _commit(REPO_ROOT),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    with open(os.path.join(dest, META_NAME), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def mismatches(meta: dict, digest: str, torch_version: str, file_name: str, capability: tuple) -> list:
    """Why a prebuilt extension described by ``meta`` may not be used here (empty: it may): built from
    other sources than ``digest``, against another torch, for another Python, or not for a GPU of
    ``capability`` (major, minor)."""
    from lora_kernels.ops.nf4_gemv import built_for, parse_cuda_archs

    reasons = []
    if meta.get("digest") != digest:
        reasons.append(f"built from other csrc/ sources or build flags (commit {meta.get('commit')})")
    if meta.get("torch") != torch_version:
        reasons.append(f"built against torch {meta.get('torch')}, this is torch {torch_version}")
    if meta.get("file") != file_name:
        reasons.append(f"built as {meta.get('file')}, this Python imports {file_name}")
    archs = meta.get("archs") or []
    try:
        runs_here = built_for(parse_cuda_archs("_".join(archs)), capability)
    except ValueError:
        runs_here = False
    if not runs_here:
        reasons.append(f"built for sm_{', sm_'.join(archs) or '?'}, this GPU is sm_{capability[0]}{capability[1]}")
    return reasons


def unpack(src: str, root: str = REPO_ROOT, capability=None) -> int:
    """Install ``src``'s prebuilt extension as ``root``/lora_kernels/<its file> when ``mismatches``
    finds nothing (``capability``: the GPU's, default CUDA device 0); returns 0, else prints why not and
    returns 1. Whether it loads is the caller's check (a fresh process: ``load_extension``)."""
    import torch

    meta_path = os.path.join(src, META_NAME)
    if not os.path.isfile(meta_path) or not os.path.isfile(os.path.join(src, PACKED_NAME)):
        print(f"no prebuilt extension in {src}/ ({META_NAME}, {PACKED_NAME})")
        return 1
    with open(meta_path) as f:
        meta = json.load(f)
    if capability is None:
        if not torch.cuda.is_available():
            print("no CUDA device: the prebuilt extension is not installed")
            return 1
        capability = torch.cuda.get_device_capability(0)
    reasons = mismatches(meta, BUILD_FLAGS.source_digest(root), torch.__version__, extension_file_name(),
                         tuple(capability))
    if reasons:
        print("prebuilt extension not used: " + "; ".join(reasons))
        return 1
    with lzma.open(os.path.join(src, PACKED_NAME), "rb") as f:
        data = f.read()
    if len(data) != meta.get("bytes"):
        print(f"prebuilt extension not used: {len(data)} bytes unpacked, {meta.get('bytes')} packed")
        return 1
    target = os.path.join(root, "lora_kernels", meta["file"])
    with open(target + ".tmp", "wb") as f:
        f.write(data)
    os.chmod(target + ".tmp", 0o755)
    os.replace(target + ".tmp", target)
    print(f"prebuilt lora_kernels._C installed: {target} (sm_{', sm_'.join(meta['archs'])}, torch {meta['torch']}, "
          f"commit {meta.get('commit')}, built {meta.get('date')})")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_kernels.tools.prebuilt_extension",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="pack a built extension into DEST (on the CPU machine)")
    p.add_argument("--so", required=True, help="the built lora_kernels/_C*.so")
    p.add_argument("--root", required=True, help="the tree it was built from")
    p.add_argument("--archs", required=True, nargs="+", help="the architectures it was built for")
    p.add_argument("--dest", default=os.path.join(REPO_ROOT, ".whl"))
    u = sub.add_parser("unpack", help="install a packed extension when it matches (on the GPU machine)")
    u.add_argument("--src", default=os.path.join(REPO_ROOT, ".whl"))
    args = parser.parse_args(argv)
    if args.command == "pack":
        meta = pack(args.so, args.root, args.archs, args.dest)
        print(f"packed {args.so} into {args.dest}/{PACKED_NAME}: " + json.dumps(meta))
        return 0
    return unpack(args.src)


if __name__ == "__main__":
    sys.exit(main())
