"""lora_kernels.tools.prebuilt_extension: an extension built on the CPU machine is installed on the GPU
machine only when it was built from the same csrc/ and build flags, against the same torch and Python,
for that GPU; and then byte for byte. Checked on fake trees and files (no GPU, no CUDA torch here)."""
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_kernels.tools import prebuilt_extension as pe
from lora_kernels.tools.csrc_check import BUILD_FLAGS

RUN_DEVICE = Path(__file__).resolve().parents[2] / "benchmarks" / "run_device.sh"
BUILD_INPUTS = ["csrc/gemv.cu", "csrc/kernels.cuh", "csrc/bindings.cpp", "csrc/build_flags.py", "setup.py"]


def _tree(root: Path) -> Path:
    """A repository-like tree: what a build reads, and what it does not (docs, the CPU emulation)."""
    for i, rel in enumerate(BUILD_INPUTS + ["csrc/README.md", "csrc/emulation/fiber.h"]):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"// file {i}: {os.urandom(8).hex()}\n")
    (root / "lora_kernels").mkdir()
    return root


def _fake_so(tmp_path: Path, size: int = 3000) -> Path:
    so = tmp_path / "built" / pe.extension_file_name()
    so.parent.mkdir()
    so.write_bytes(os.urandom(size))
    return so


@pytest.fixture
def cuda_torch(monkeypatch):
    """pack asks for a CUDA torch (the one that built the file); the CPU wheel says None."""
    monkeypatch.setattr(torch.version, "cuda", "13.0")


@pytest.mark.parametrize("rel", BUILD_INPUTS)
def test_digest_changes_with_every_build_input(tmp_path, rel):
    root = _tree(tmp_path)
    before = BUILD_FLAGS.source_digest(str(root))
    assert BUILD_FLAGS.source_digest(str(root)) == before
    (root / rel).write_text((root / rel).read_text() + " ")
    assert BUILD_FLAGS.source_digest(str(root)) != before


def test_digest_ignores_what_the_build_does_not_read_and_sees_renames(tmp_path):
    root = _tree(tmp_path)
    before = BUILD_FLAGS.source_digest(str(root))
    (root / "csrc/README.md").write_text("other docs")
    (root / "csrc/emulation/fiber.h").write_text("other emulation")
    assert BUILD_FLAGS.source_digest(str(root)) == before
    (root / "csrc/gemv.cu").rename(root / "csrc/gemv2.cu")  # same bytes, another translation unit
    assert BUILD_FLAGS.source_digest(str(root)) != before


def test_digest_of_a_new_empty_source_differs(tmp_path):
    root = _tree(tmp_path)
    before = BUILD_FLAGS.source_digest(str(root))
    (root / "csrc/extra.cu").write_text("")
    assert BUILD_FLAGS.source_digest(str(root)) != before


def test_pack_then_unpack_installs_the_same_bytes(tmp_path, cuda_torch, capsys):
    root = _tree(tmp_path / "repo")
    so = _fake_so(tmp_path)
    meta = pe.pack(str(so), str(root), ["90"], str(tmp_path / "whl"), strip=False)
    assert meta["torch"] == torch.__version__ and meta["archs"] == ["90"] and meta["file"] == so.name
    assert (tmp_path / "whl" / pe.PACKED_NAME).stat().st_size < so.stat().st_size + 200
    assert pe.unpack(str(tmp_path / "whl"), root=str(root), capability=(9, 0)) == 0
    installed = root / "lora_kernels" / so.name
    assert installed.read_bytes() == so.read_bytes()
    assert installed.stat().st_mode & stat.S_IXUSR
    assert "prebuilt lora_kernels._C installed" in capsys.readouterr().out


@pytest.mark.parametrize("change", ["sources", "torch", "python", "gpu", "corrupt"])
def test_unpack_refuses_what_does_not_match(tmp_path, cuda_torch, monkeypatch, capsys, change):
    root = _tree(tmp_path / "repo")
    so = _fake_so(tmp_path)
    whl = tmp_path / "whl"
    pe.pack(str(so), str(root), ["90"], str(whl), strip=False)
    capability, expected = (9, 0), None
    if change == "sources":
        (root / "csrc/kernels.cuh").write_text("// edited after the build\n")
        expected = "other csrc/ sources"
    elif change == "torch":
        monkeypatch.setattr(torch, "__version__", "1.0.0+cu130")  # no torch the suite runs with
        expected = "this is torch 1.0.0"
    elif change == "python":  # the next minor Python's tag: not this one's
        tag = f"cpython-{sys.version_info.major}{sys.version_info.minor + 1}"
        monkeypatch.setattr(pe, "extension_file_name", lambda: f"_C.{tag}-x86_64-linux-gnu.so")
        expected = f"this Python imports _C.{tag}"
    elif change == "gpu":
        capability, expected = (8, 0), "built for sm_90, this GPU is sm_80"
    else:  # the packed file does not hold what the metadata says
        import lzma
        with lzma.open(whl / pe.PACKED_NAME, "wb") as f:
            f.write(b"truncated")
        expected = "bytes unpacked"
    assert pe.unpack(str(whl), root=str(root), capability=capability) == 1
    assert expected in capsys.readouterr().out
    assert not list((root / "lora_kernels").iterdir())


def test_mismatches_follow_where_sass_runs():
    meta = {"digest": "d", "torch": "t", "file": "f", "archs": ["80"]}
    assert pe.mismatches(meta, "d", "t", "f", (8, 6)) == []  # sm_80 SASS runs on sm_86
    assert pe.mismatches(meta, "d", "t", "f", (9, 0)) == ["built for sm_80, this GPU is sm_90"]
    meta["archs"] = ["90a"]
    assert pe.mismatches(meta, "d", "t", "f", (9, 0)) == []
    assert len(pe.mismatches({**meta, "archs": ["junk"]}, "d", "t", "f", (9, 0))) == 1
    assert len(pe.mismatches({}, "d", "t", "f", (9, 0))) == 4


def test_unpack_without_a_packed_extension_says_so(tmp_path, capsys):
    assert pe.unpack(str(tmp_path), root=str(_tree(tmp_path / "repo")), capability=(9, 0)) == 1
    assert "no prebuilt extension" in capsys.readouterr().out


def test_pack_refuses_a_cpu_torch_and_a_foreign_file_name(tmp_path):
    root = _tree(tmp_path / "repo")
    so = _fake_so(tmp_path)
    if torch.version.cuda is None:
        with pytest.raises(ValueError, match="not a CUDA build"):
            pe.pack(str(so), str(root), ["90"], str(tmp_path / "whl"), strip=False)
    other = so.with_name("_C.cpython-399-x86_64-linux-gnu.so")
    so.rename(other)
    with pytest.raises(ValueError, match="so_path: expected a file named"):
        pe.pack(str(other), str(root), ["90"], str(tmp_path / "whl"), strip=False)
    with pytest.raises(FileNotFoundError, match="so_path"):
        pe.pack(str(so), str(root), ["90"], str(tmp_path / "whl"), strip=False)


@pytest.mark.skipif(not (shutil.which("cc") and shutil.which("strip")), reason="needs cc and strip")
def test_pack_strips_host_debug_info_of_a_real_shared_object(tmp_path, cuda_torch):
    src = tmp_path / "x.c"
    src.write_text("int lk_answer(void) { return 42; }\n")
    so = tmp_path / "built" / pe.extension_file_name()
    so.parent.mkdir()
    subprocess.run(["cc", "-g", "-shared", "-fPIC", str(src), "-o", str(so)], check=True)
    root = _tree(tmp_path / "repo")
    meta = pe.pack(str(so), str(root), ["90"], str(tmp_path / "whl"))
    assert meta["bytes"] < so.stat().st_size
    assert pe.unpack(str(tmp_path / "whl"), root=str(root), capability=(9, 0)) == 0
    import ctypes
    assert ctypes.CDLL(str(root / "lora_kernels" / so.name)).lk_answer() == 42


def test_run_device_build_step_tries_the_prebuilt_extension_then_compiles(tmp_path, monkeypatch, capsys):
    text = RUN_DEVICE.read_text().replace("\\\n", " ")
    build = re.search(r"^\s*build\)(.*?);;", text, flags=re.S | re.M).group(1)
    unpack_cmd = re.search(r"python -m lora_kernels\.tools\.prebuilt_extension ([^>]*)>", build).group(1)
    # its command line parses with the real CLI; without .whl/ it says so and fails, so the step compiles
    monkeypatch.chdir(tmp_path)
    assert pe.main(shlex.split(unpack_cmd)) == 1
    assert "no prebuilt extension" in capsys.readouterr().out
    otherwise = re.search(r"^\s*else\s*$", build, flags=re.M).start()
    assert build.index("prebuilt_extension unpack") < build.index("load_extension") < otherwise
    assert otherwise < build.index("rm -f lora_kernels/_C*.so") < build.index("setup.py build_ext --inplace")
