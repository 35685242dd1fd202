"""Fast checks of the csrc/ compile check: the ptxas -v parser on captured output, the build flags
setup.py reads too (csrc/build_flags.py), and one real nvcc compile of a tiny kernel (skipped without nvcc)."""
import ast
import json
import os

import pytest

from lora_kernels.tools import csrc_check

# ptxas -v output as nvcc prints it (CUDA 13 wording, plus the older one without "used N barriers"):
# two kernels for two architectures, spills in the sm_80 build of one, a non-inlined device function.
PTXAS_SAMPLE = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN12lora_kernels6decodeILi16EEEvPKfPfi' for 'sm_80'
ptxas info    : Function properties for _ZN12lora_kernels6decodeILi16EEEvPKfPfi
    40 bytes stack frame, 36 bytes spill stores, 44 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 4160 bytes smem, 400 bytes cmem[0]
ptxas info    : Compile time = 12.034 ms
ptxas info    : Compiling entry function '_Z6shrinkPKfPfi' for 'sm_80'
ptxas info    : Function properties for _Z6shrinkPKfPfi
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, 384 bytes smem, 400 bytes cmem[0]
ptxas info    : Compile time = 2.100 ms
ptxas info    : Function properties for _Z6helperfi
    8 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN12lora_kernels6decodeILi16EEEvPKfPfi' for 'sm_90'
ptxas info    : Function properties for _ZN12lora_kernels6decodeILi16EEEvPKfPfi
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 4160 bytes smem
ptxas info    : Compile time = 10.500 ms
ptxas info    : Compiling entry function '_Z6shrinkPKfPfi' for 'sm_90'
ptxas info    : Function properties for _Z6shrinkPKfPfi
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 38 registers, used 0 barriers
ptxas info    : Compile time = 1.900 ms
"""

TINY_KERNEL = """\
__global__ void tiny_scale(const float* __restrict__ x, float* __restrict__ y, float s, int n) {
  __shared__ float buf[128];
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  buf[threadIdx.x] = i < n ? x[i] : 0.f;
  __syncthreads();
  if (i < n) y[i] = buf[127 - threadIdx.x] * s;
}
"""


def test_parse_ptxas_rows_and_spills():
    rows = csrc_check.parse_ptxas(PTXAS_SAMPLE)
    got = {(r["kernel"], r["arch"]): r for r in rows}
    assert len(rows) == 5 and len(got) == 5
    spilling = got[("_ZN12lora_kernels6decodeILi16EEEvPKfPfi", "sm_80")]
    assert spilling == {"kernel": "_ZN12lora_kernels6decodeILi16EEEvPKfPfi", "arch": "sm_80", "entry": True,
                        "regs": 255, "barriers": 1, "smem": 4160, "stack": 40, "spill_stores": 36,
                        "spill_loads": 44}
    assert csrc_check.spilled(spilling)
    old_format = got[("_Z6shrinkPKfPfi", "sm_80")]  # no "used N barriers"
    assert (old_format["regs"], old_format["smem"], old_format["barriers"]) == (40, 384, 0)
    helper = got[("_Z6helperfi", "sm_80")]  # device function: a stack frame but no spill
    assert helper["entry"] is False and helper["regs"] is None and helper["stack"] == 8
    assert [csrc_check.spilled(r) for r in rows] == [True, False, False, False, False]
    assert got[("_ZN12lora_kernels6decodeILi16EEEvPKfPfi", "sm_90")]["regs"] == 168
    assert got[("_Z6shrinkPKfPfi", "sm_90")]["smem"] == 0


def test_rows_status_and_names():
    results = [
        {"file": "a.cu", "arch": "sm_80", "kind": "object", "rc": 0, "log": PTXAS_SAMPLE},
        {"file": "b.cpp", "arch": "host", "kind": "host", "rc": 1,
         "log": "b.cpp:3:5: warning: unused\nb.cpp:7:1: error: 'foo' was not declared in this scope\n"},
    ]
    rows = csrc_check.rows_from_results(results)
    status = {(r["file"], r["kernel"], r["arch"]): csrc_check.status(r) for r in rows}
    if csrc_check.shutil.which("c++filt"):
        assert status[("a.cu", "lora_kernels::decode<16>", "sm_80")] == "SPILL"
        assert status[("a.cu", "shrink", "sm_90")] == "ok"
        assert status[("a.cu", "helper", "sm_80")] == "ok (device function)"
    assert status[("b.cpp", "-", "host")] == "COMPILE ERROR"
    assert "not declared" in next(r for r in rows if r["file"] == "b.cpp")["error"]
    table = csrc_check.format_table(rows)
    assert "SPILL" in table and "COMPILE ERROR" in table
    assert csrc_check.short_name("void ns::(anonymous namespace)::k<float, (int)4>(float const*, int)") \
        == "ns::k<float, (int)4>"


def test_main_empty_dir(tmp_path, capsys):
    assert csrc_check.main(["--csrc", str(tmp_path)]) == 0
    assert "nothing to check" in capsys.readouterr().out


def test_main_without_nvcc(tmp_path, monkeypatch, capsys):
    (tmp_path / "k.cu").write_text(TINY_KERNEL)
    monkeypatch.setattr(csrc_check, "find_nvcc", lambda: None)
    assert csrc_check.main(["--csrc", str(tmp_path)]) == 1
    assert "nvcc not found" in capsys.readouterr().err
    monkeypatch.setenv(csrc_check.SKIP_ENV, "skip")
    assert csrc_check.main(["--csrc", str(tmp_path)]) == 0
    assert "SKIPPED" in capsys.readouterr().err


def _setup_py_namespace() -> dict:
    """setup.py's module-level constants and helper functions, without running setup()."""
    path = os.path.join(csrc_check.REPO_ROOT, "setup.py")
    tree = ast.parse(open(path).read())
    keep = [node for node in tree.body if isinstance(node, (ast.Assign, ast.FunctionDef, ast.Import))]
    ns = {"__file__": path}
    exec(compile(ast.Module(body=keep, type_ignores=[]), path, "exec"), ns)
    return ns


def test_setup_py_and_the_check_read_the_same_build_flags():
    # One definition (csrc/build_flags.py) for the build and the compile-only check.
    setup_flags = _setup_py_namespace()["BUILD_FLAGS"]
    for name in ("OPT_FLAGS", "NVCC_FLAGS", "DEFAULT_CUDA_ARCHS"):
        assert getattr(setup_flags, name) == getattr(csrc_check.BUILD_FLAGS, name)
    assert setup_flags.__file__ == csrc_check.BUILD_FLAGS.__file__
    assert csrc_check.OPT_FLAGS is csrc_check.BUILD_FLAGS.OPT_FLAGS
    assert csrc_check.NVCC_FLAGS is csrc_check.BUILD_FLAGS.NVCC_FLAGS


def test_build_flags():
    flags = csrc_check.BUILD_FLAGS
    assert flags.cxx_std("2.12.1") == "c++17" and flags.cxx_std("2.6.0+cu124") == "c++17"
    for version in ("2.13.0", "2.13.0+cpu", "2.14.0.dev20260101+cu130", "3.0.0"):
        assert flags.cxx_std(version) == "c++20", version
    assert flags.cuda_archs("") == ["80", "90"]
    assert flags.cuda_archs("90") == ["90"]
    assert flags.cuda_archs("8.0; 9.0") == ["80", "90"]
    assert flags.cuda_archs("sm_90a,80") == ["90a", "80"]
    with pytest.raises(ValueError, match=flags.CUDA_ARCHS_ENV):
        flags.cuda_archs("hopper")
    assert flags.gencode_flags(["80", "90"]) == ["-gencode=arch=compute_80,code=sm_80",
                                                 "-gencode=arch=compute_90,code=sm_90"]
    assert not any("fast_math" in f or "fast-math" in f for f in flags.OPT_FLAGS + flags.NVCC_FLAGS)


@pytest.mark.skipif(csrc_check.find_nvcc() is None, reason="nvcc not installed")
def test_compile_tiny_kernel(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "tiny.cu").write_text(TINY_KERNEL)
    out = tmp_path / "rows.json"
    assert csrc_check.main(["--csrc", str(src), "--arch", "80", "90", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert data["meta"]["targets"] == ["sm_80", "sm_90"] and "nvcc" in data["meta"]
    assert data["meta"]["torch"] and data["meta"]["utc_date"]
    assert sorted(r["arch"] for r in rows) == ["sm_80", "sm_90"]
    for r in rows:
        assert r["entry"] is True and r["kernel"].startswith("tiny_scale")
        assert r["regs"] > 0 and r["smem"] == 512
        assert not csrc_check.spilled(r) and r["error"] is None
    for c in data["compiles"]:
        assert "--use_fast_math" not in c["cmd"] and "-lineinfo" in c["cmd"] and "-O3" in c["cmd"]


@pytest.mark.skipif(csrc_check.find_nvcc() is None, reason="nvcc not installed")
def test_compile_error_fails(tmp_path, capsys):
    (tmp_path / "bad.cu").write_text("__global__ void bad(float* y) { y[0] = undeclared_name; }\n")
    assert csrc_check.main(["--csrc", str(tmp_path), "--arch", "90"]) == 1
    out = capsys.readouterr().out
    assert "COMPILE ERROR" in out and "undeclared_name" in out
