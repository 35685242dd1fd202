"""Compile-only check of the hand-written CUDA sources in csrc/, without a GPU: every ``*.cu`` is
compiled by nvcc for each target architecture (sm_80 and sm_90 by default) with ``-Xptxas -v``, and
every ``*.cpp`` as host C++ (the system c++, or $CXX), against the installed torch's headers and with
the flags setup.py builds ``lora_kernels._C`` with. Nothing is linked; objects go to a temp dir.

Per kernel and architecture the table shows registers, shared memory, stack frame and spill bytes
from ptxas. Exit status 1 on any compile error or any spill (> 0 bytes spill stores or loads,
kernels and non-inlined device functions alike); 0 when csrc/ has no sources. Without nvcc the
check fails (CI requires it) unless LORA_KERNELS_CSRC_CHECK=skip, which skips it with a warning.

    python -m lora_kernels.tools.csrc_check [--arch 80 90] [--csrc DIR] [--jobs N] [--json PATH]

A .cu file is compiled once as an object for the first architecture (host code included), and once
per further architecture as a cubin (device code only), so the architectures compile in parallel.
A CPU torch wheel lacks the generated header c10/cuda/impl/cuda_cmake_macros.h; the check then
supplies a stand-in with the content a CUDA wheel's has (it only matters on Windows).
"""
import argparse
import concurrent.futures
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CSRC = os.path.join(REPO_ROOT, "csrc")
SKIP_ENV = "LORA_KERNELS_CSRC_CHECK"


def _load_build_flags():
    """csrc/build_flags.py, by path: the flags setup.py builds ``lora_kernels._C`` with. The tools that
    read csrc/ (this check, the emulation, the prebuilt extension) work in a checkout of the repository:
    an installed wheel holds the package only."""
    path = os.path.join(DEFAULT_CSRC, "build_flags.py")
    if not os.path.isfile(path):
        raise ImportError(f"lora_kernels.tools.csrc_check needs the repository's csrc/ beside the package "
                          f"(a checkout, or an editable install): {path} not found")
    spec = importlib.util.spec_from_file_location("lora_kernels_build_flags", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILD_FLAGS = _load_build_flags()
OPT_FLAGS = BUILD_FLAGS.OPT_FLAGS
NVCC_FLAGS = BUILD_FLAGS.NVCC_FLAGS
cxx_std = BUILD_FLAGS.cxx_std
# What torch's BuildExtension adds on its own when setup.py builds the extension (and
# torch's COMMON_NVCC_FLAGS, read at run time below).
EXTENSION_DEFINES = ["-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H"]
CMAKE_MACROS_STUB = ("c10/cuda/impl/cuda_cmake_macros.h",
                     "#pragma once\n// Stand-in written by lora_kernels.tools.csrc_check: the CPU torch wheel\n"
                     "// lacks this generated header (a CUDA wheel's has exactly this line).\n"
                     "#define C10_CUDA_BUILD_SHARED_LIBS\n")


# --------------------------------------------------------------------------- ptxas output parsing

_ENTRY_RE = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPS_RE = re.compile(r"Function properties for (\S+)")
_FRAME_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED_RE = re.compile(r"Used (\d+) registers")
_BARRIERS_RE = re.compile(r"used (\d+) barriers")
_SMEM_RE = re.compile(r"(\d+) bytes smem")
_ARCH_HINT_RE = re.compile(r"for '(sm_\w+)'")


def parse_ptxas(text: str, default_arch=None) -> list:
    """Rows {kernel (mangled), arch, entry, regs, barriers, smem, stack, spill_stores, spill_loads}
    from ``ptxas -v`` output, one per entry function (and per non-inlined device function that
    ptxas reports properties for: regs None) per architecture."""
    rows, current, arch = [], None, default_arch
    pending = None  # function named by the last "Function properties for" line
    for line in text.splitlines():
        m = _ENTRY_RE.search(line)
        if m:
            arch = m.group(2)
            current = {"kernel": m.group(1), "arch": arch, "entry": True, "regs": None, "barriers": 0,
                       "smem": 0, "stack": 0, "spill_stores": 0, "spill_loads": 0}
            rows.append(current)
            pending = None
            continue
        if "Compiling" in line and "for 'sm_" in line:  # e.g. "Compiling function ... for 'sm_90'"
            arch = _ARCH_HINT_RE.search(line).group(1)
        m = _PROPS_RE.search(line)
        if m:
            pending = m.group(1)
            continue
        m = _FRAME_RE.search(line)
        if m and pending is not None:
            stack, stores, loads = map(int, m.groups())
            if current is not None and current["kernel"] == pending:
                row = current
            else:  # a device function compiled on its own (noinline / recursion / indirect call)
                row = {"kernel": pending, "arch": arch, "entry": False, "regs": None, "barriers": 0,
                       "smem": 0}
                rows.append(row)
            row.update(stack=stack, spill_stores=stores, spill_loads=loads)
            pending = None
            continue
        m = _USED_RE.search(line)
        if m and current is not None and current["regs"] is None:
            current["regs"] = int(m.group(1))
            b = _BARRIERS_RE.search(line)
            s = _SMEM_RE.search(line)
            current["barriers"] = int(b.group(1)) if b else 0
            current["smem"] = int(s.group(1)) if s else 0
    return rows


def spilled(row) -> bool:
    return bool(row.get("spill_stores") or row.get("spill_loads"))


def demangle(names) -> dict:
    """Mangled -> demangled names via c++filt (identity where c++filt is missing or fails)."""
    names = sorted(set(names))
    cxxfilt = shutil.which("c++filt")
    if not names or not cxxfilt:
        return {n: n for n in names}
    try:
        out = subprocess.run([cxxfilt], input="\n".join(names) + "\n", capture_output=True, text=True,
                             timeout=60, check=True).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return {n: n for n in names}
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


# --------------------------------------------------------------------------- toolchain

def find_nvcc():
    """nvcc on PATH, else under $CUDA_HOME / $CUDA_PATH / /usr/local/cuda; None if none."""
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
            return os.path.join(home, "bin", "nvcc")
    return None


def cuda_include_dir(nvcc: str):
    """The CUDA toolkit's include dir (for host-compiled .cpp files, as CUDAExtension adds it)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                  os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"]
    for home in candidates:
        if home and os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h")):
            return os.path.join(home, "include")
    try:  # a wrapper script (e.g. /usr/local/bin/nvcc): ask nvcc where its headers are
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60).stderr
        for inc in re.findall(r'INCLUDES="([^"]*)"', out):
            for flag in inc.split():
                path = flag[2:].strip('"') if flag.startswith("-I") else None
                if path and os.path.isfile(os.path.join(path, "cuda_runtime_api.h")):
                    return os.path.normpath(path)
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def tool_version(cmd) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip().splitlines()
        return out[-1] if out else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def compile_flags(stub_dir: str) -> dict:
    """Include dirs, defines and standard as setup.py's CUDAExtension + BuildExtension use them."""
    import torch
    from torch.utils import cpp_extension

    includes = list(cpp_extension.include_paths())
    includes.append(sysconfig.get_paths()["include"])  # Python.h (torch/extension.h -> pybind11)
    if not any(os.path.isfile(os.path.join(d, CMAKE_MACROS_STUB[0])) for d in includes):
        path = os.path.join(stub_dir, CMAKE_MACROS_STUB[0])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(CMAKE_MACROS_STUB[1])
        includes.append(stub_dir)  # last: a real header always wins
    std = cxx_std(torch.__version__)
    defines = EXTENSION_DEFINES + [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    return {"includes": includes, "defines": defines, "std": f"-std={std}",
            "nvcc_common": list(cpp_extension.COMMON_NVCC_FLAGS), "torch": torch.__version__,
            "stub": stub_dir in includes}


def build_tasks(sources, archs, flags, nvcc, cxx, cuda_include, out_dir) -> list:
    """One compile command per (file, architecture) for .cu files and per .cpp file."""
    inc = [f"-I{d}" for d in flags["includes"]]
    tasks = []
    for src in sources:
        stem = os.path.basename(src)
        if src.endswith(".cu"):
            for i, arch in enumerate(archs):
                kind = "object" if i == 0 else "cubin"
                out = os.path.join(out_dir, f"{stem}.sm_{arch}.{'o' if i == 0 else 'cubin'}")
                cmd = [nvcc, "-c" if i == 0 else "-cubin", src, "-o", out, *inc, *flags["defines"],
                       flags["std"], *OPT_FLAGS, *NVCC_FLAGS, *flags["nvcc_common"],
                       f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v",
                       "--compiler-options", "-fPIC"]
                if os.environ.get("CC"):
                    cmd += ["-ccbin", os.environ["CC"]]
                tasks.append({"file": stem, "arch": f"sm_{arch}", "kind": kind, "cmd": cmd})
        else:
            out = os.path.join(out_dir, f"{stem}.o")
            cmd = [cxx, "-c", src, "-o", out, "-fPIC", *inc,
                   *([f"-I{cuda_include}"] if cuda_include else []), *flags["defines"],
                   BUILD_FLAGS.archs_define(archs), flags["std"], *OPT_FLAGS]
            tasks.append({"file": stem, "arch": "host", "kind": "host", "cmd": cmd})
    return tasks


def run_task(task, timeout) -> dict:
    start = time.monotonic()
    try:
        proc = subprocess.run(task["cmd"], capture_output=True, text=True, timeout=timeout)
        rc, log = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, log = -1, f"timed out after {timeout} s\n{exc.stderr or ''}"
    except OSError as exc:
        rc, log = -1, f"{type(exc).__name__}: {exc}"
    return {**task, "rc": rc, "log": log, "seconds": round(time.monotonic() - start, 1)}


# --------------------------------------------------------------------------- report

def rows_from_results(results) -> list:
    rows = []
    for res in results:
        base = {"file": res["file"], "compile": res["arch"] + (" (host)" if res["kind"] == "object" else "")}
        if res["rc"] != 0:
            rows.append({**base, "kernel": "-", "arch": res["arch"], "entry": None,
                         "error": _error_summary(res["log"])})
            continue
        parsed = parse_ptxas(res["log"], res["arch"]) if res["kind"] != "host" else []
        if not parsed:
            rows.append({**base, "kernel": "-", "arch": res["arch"], "entry": None, "error": None})
        for row in parsed:
            rows.append({**base, **row, "error": None})
    names = demangle(r["kernel"] for r in rows if r["kernel"] != "-")
    for r in rows:
        r["mangled"] = r["kernel"]
        r["demangled"] = names.get(r["kernel"], r["kernel"])
        r["kernel"] = short_name(r["demangled"])
    return rows


def short_name(demangled: str) -> str:
    """A table-sized kernel name: no return type, argument list or anonymous namespace
    ("void ns::(anonymous namespace)::k<float, 4>(float const*, int)" -> "ns::k<float, 4>")."""
    name = demangled.replace("(anonymous namespace)::", "")
    if name.endswith(")"):  # strip the balanced trailing argument list
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                name = name[:i]
                break
    return re.sub(r"^(?:void|auto)\s+", "", name)


def _error_summary(log: str) -> str:
    for line in log.splitlines():
        if re.search(r"\berror\b|fatal|timed out|Error:", line):
            return line.strip()[:300]
    return (log.strip().splitlines() or ["failed"])[-1][:300]


def status(row) -> str:
    if row.get("error"):
        return "COMPILE ERROR"
    if spilled(row):
        return "SPILL"
    return "ok" if row.get("entry") is not False else "ok (device function)"


def format_table(rows) -> str:
    def cell(row, key):
        if row.get("error") or row.get(key) is None:
            return "-"
        return str(row[key])

    width = max([len("kernel")] + [len(r["kernel"]) for r in rows])
    fwidth = max([len("file")] + [len(r["file"]) for r in rows])
    head = (f"{'file':{fwidth}} {'kernel':{width}} {'arch':6} {'regs':>4} {'smem B':>7} {'stack B':>7} "
            f"{'spill st B':>10} {'spill ld B':>10} status")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['file']:{fwidth}} {r['kernel']:{width}} {r['arch']:6} {cell(r, 'regs'):>4} "
                     f"{cell(r, 'smem'):>7} {cell(r, 'stack'):>7} {cell(r, 'spill_stores'):>10} "
                     f"{cell(r, 'spill_loads'):>10} {status(r)}")
    return "\n".join(lines)


def _error_excerpt(log: str, limit: int = 60) -> str:
    """The compiler's error lines with a little context (torch's header warnings left out)."""
    lines = log.splitlines()
    keep = set()
    for i, line in enumerate(lines):
        if re.search(r"\berror\b|fatal|timed out", line):
            keep.update(range(max(0, i - 2), min(len(lines), i + 4)))
    picked = [lines[i] for i in sorted(keep)] or lines[-limit:]
    return "\n".join(picked[:limit]) + ("\n[...]" if len(picked) > limit else "")


def _warn_skip(msg: str) -> None:
    bar = "!" * 78
    print(f"{bar}\nWARNING: {msg}\nWARNING: the csrc/ CUDA compile check was SKIPPED ({SKIP_ENV}=skip): "
          f"nothing in csrc/ was compiled.\n{bar}", file=sys.stderr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[int(a) for a in BUILD_FLAGS.DEFAULT_CUDA_ARCHS],
                        help="SM architectures (default: 80 90)")
    parser.add_argument("--csrc", default=DEFAULT_CSRC, help="directory of the .cu / .cpp sources (default: csrc/)")
    parser.add_argument("--jobs", type=int, help="parallel compiles (default: CPU count)")
    parser.add_argument("--json", help="also write the rows (and compile logs) to this JSON file")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per compile (default 1800)")
    args = parser.parse_args(argv)

    if os.environ.get(SKIP_ENV) == "skip":
        _warn_skip(f"{SKIP_ENV}=skip is set")
        return 0
    csrc = os.path.abspath(args.csrc)
    sources = sorted(os.path.join(csrc, f) for f in (os.listdir(csrc) if os.path.isdir(csrc) else [])
                     if f.endswith((".cu", ".cpp")))
    if not sources:
        print(f"csrc_check: no .cu / .cpp sources in {csrc}: nothing to check")
        return 0
    nvcc = find_nvcc()
    if nvcc is None:
        print("csrc_check: ERROR: nvcc not found (not on PATH, nor under $CUDA_HOME, $CUDA_PATH or "
              f"/usr/local/cuda). The compile check of {csrc} needs the CUDA toolkit's nvcc (no GPU needed); "
              f"install it, or set {SKIP_ENV}=skip to skip the check.", file=sys.stderr)
        return 1
    cxx = os.environ.get("CXX") or shutil.which("c++") or "g++"
    archs = list(dict.fromkeys(args.arch))

    with tempfile.TemporaryDirectory(prefix="csrc_check_") as tmp:
        flags = compile_flags(os.path.join(tmp, "stub"))
        cuda_include = cuda_include_dir(nvcc) if any(s.endswith(".cpp") for s in sources) else None
        tasks = build_tasks(sources, archs, flags, nvcc, cxx, cuda_include, tmp)
        print(f"csrc_check: {len(sources)} sources in {csrc}, {len(tasks)} compiles for "
              f"{', '.join(f'sm_{a}' for a in archs)}; {tool_version([nvcc, '--version'])}; torch "
              f"{flags['torch']} headers, {flags['std']}"
              + ("; stand-in c10/cuda/impl/cuda_cmake_macros.h (CPU torch wheel)" if flags["stub"] else ""),
              flush=True)
        jobs = max(1, args.jobs or os.cpu_count() or 1)
        start = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(lambda t: run_task(t, args.timeout), tasks))
        wall = time.monotonic() - start

    rows = rows_from_results(results)
    print(format_table(rows))
    for res in results:
        if res["rc"] != 0:
            print(f"\n==== {res['file']} ({res['arch']}, {res['kind']}) failed (exit {res['rc']}):\n"
                  f"{' '.join(res['cmd'])}\n{_error_excerpt(res['log'])}")
    print("\ncompile times: " + ", ".join(f"{r['file']} {r['arch']} {r['seconds']:.1f} s" for r in results)
          + f"; {wall:.1f} s wall with {jobs} jobs")
    if args.json:
        from lora_kernels.tools.bench import environment_metadata  # imports torch: only when writing
        meta = dict(environment_metadata(), nvcc=tool_version([nvcc, "--version"]),
                    targets=[f"sm_{a}" for a in archs])
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows, "compiles": results}, f, indent=1)
    errors = [r for r in results if r["rc"] != 0]
    spills = [r for r in rows if spilled(r) and not r.get("error")]
    print(f"{len(results)} compiles: {len(errors)} errors; {sum(r.get('entry') is True for r in rows)} kernel rows, "
          f"{len(spills)} spill")
    return 1 if errors or spills else 0


if __name__ == "__main__":
    sys.exit(main())
