#!/usr/bin/env bash
# One call on a lent GPU machine (no network): put a carried bitsandbytes wheel (.whl/) on the path,
# use the machine's torch/triton, then run the requested steps (default: all), writing everything
# under $OUT (default benchmarks/results/device-run) and printing a summary per step.
#   device tool: command "bash benchmarks/run_device.sh [steps]", carry [".whl"] (filled on the CPU
#   machine by benchmarks/fetch_device_wheels.sh: bitsandbytes; the machine has pytest-xdist; and by
#   benchmarks/prebuild_device_extension.sh: lora_kernels._C built there for this GPU, which "build" installs)
#   steps: build tests-launch tests-graphs tests tests-nf4 tests-gemv sanitizer gemv qlora-small-m overhead ncu-gemv tests-property bench bench-quick qlora qlora-quick memory train train-routes variants dora split-k csrc tests-all
#   aliases: first = build tests-launch gemv bench-quick qlora-quick tests (the first call on a fresh GPU: the goal
#   figures of every benchmark first, each row checked against a reference as it is timed, then the GPU tests);
#   decide = build tests-launch tests-gemv gemv bench-quick qlora-quick train-routes qlora-small-m overhead tests-graphs (one
#   call that settles the opt-in paths written without a GPU: the tensor-core GEMV and the GEMV above 16
#   rows, the CUDA dX kernel, the CUDA slab decoder, the dense cuBLAS route, each beside the default it
#   would replace, in layer benchmarks and in 1B training steps (every benchmark row checked against a
#   reference as it is timed), after a check of the direct launches and the GPU tests of csrc/'s ops
#   (never run on a GPU in their current build); the short steps first, so that the deadline cuts the
#   sweeps: the small-M QLoRA sweep, the host time per layer call beside PEFT's (what bounds small
#   layers, and the 1B steps if the train table's GPU-busy fraction is low) and the CUDA graph tests;
#   ~9-10 minutes on an H200: the rest of the GPU tests ("tests") in a second call)
#   (each under its own time limit, so that one slow step cannot use up a 10-minute call; split them
#   over calls when the GPU is slow to compile). "build" compiles csrc/ into lora_kernels._C in place
#   for this GPU's architecture, or installs the one prebuilt in .whl/ when it matches (the later steps
#   then use the CUDA NF4 GEMV where they ask for it);
#   "tests" runs the tests that exercise the GPU (the "cuda" backend, the CUDA GEMV, the Triton dropout
#   hash; CPU CI runs the rest) except the hypothesis property tests, which "tests-property" runs
#   (their random shapes and dtypes make Triton compile anew for most examples); "tests-all" runs the
#   whole suite (long: not a default step); "sanitizer" runs the GEMV tests under compute-sanitizer
#   memcheck with torch's caching allocator off (so that an out-of-bounds access hits the end of its
#   own allocation). Each step's full log is in $OUT; pytest is stopped with SIGINT at its time limit,
#   so it still prints its summary and writes its XML.
# Time: the device call is killed at 600 s, so no step runs past DEADLINE_S (default 570) from the
# start: each step's limit is its own cap or what is left (10 s kept), a step with under 20 s left
# is skipped, and a summary (per step: seconds, and the key lines of its log) is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
# The device tool returns at most 8 files from its $OUT: when $OUT is set (the tool's), steps write to
# a scratch folder and the whole of it is archived into $OUT/device-run.tar.gz after every step (a
# killed call still returns what finished), with the summary beside it.
ARCHIVE=${OUT:-}
if [ -n "$ARCHIVE" ]; then OUT=/tmp/lk-device-run; else OUT=benchmarks/results/device-run; fi
archive() { [ -n "$ARCHIVE" ] && tar czf "$ARCHIVE/device-run.tar.gz" -C "$OUT" . 2>/dev/null; true; }
STEPS=${*:-build tests-launch tests sanitizer gemv tests-property bench qlora memory train variants split-k dora}
STEPS=${STEPS//first/build tests-launch gemv bench-quick qlora-quick tests}
STEPS=${STEPS//decide/build tests-launch tests-gemv gemv bench-quick qlora-quick train-routes qlora-small-m overhead tests-graphs}
DEADLINE_S=${DEADLINE_S:-570}
# cap N: seconds the next command may run: N, or what is left before the deadline minus 10 s
cap() { local left=$((DEADLINE_S - SECONDS - 10)); echo $(( left < $1 ? left : $1 )); }
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1  # the whole run's output archived too (versions, fallbacks, progress)
if ls .whl/*.whl >/dev/null 2>&1; then
    python -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_DEFAULT_FP_FUSION=1
nvidia-smi -L | tee "$OUT/nvidia-smi.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
python -c "import bitsandbytes, peft, transformers as t; print('bitsandbytes', bitsandbytes.__version__, 'peft', peft.__version__, 'transformers', t.__version__)" 2>&1 | tail -3
# pytest under a time limit: SIGINT first (pytest then reports what ran and writes its XML), KILL 15 s later
PYTEST_TIMEOUT="timeout -s INT -k 15"
# With pytest-xdist (on the GPU machine), test steps run in worker processes: Triton compiles on the CPU,
# so workers compile different kernels at once while sharing the one GPU (small test shapes).
XDIST=""
if python -c "import xdist" 2>/dev/null; then XDIST="-n ${PYTEST_WORKERS:-6}"; fi
echo "pytest workers: ${XDIST:-none}"
SUMMARY=()
for step in $STEPS; do
    if [ "$(cap 20)" -lt 20 ]; then
        echo "=== $step SKIPPED: $((DEADLINE_S - SECONDS)) s left"; SUMMARY+=("$step: skipped (deadline)"); continue
    fi
    echo "=== $step"
    step_start=$SECONDS
    case $step in
        build) # a prebuilt extension carried in .whl/ (benchmarks/prebuild_device_extension.sh) when it matches
               # csrc/, torch, Python and this GPU and loads; else compile. SASS for this GPU only
               # (setup.py's default builds sm_80 and sm_90: twice the nvcc time)
               if python -m lora_kernels.tools.prebuilt_extension unpack --src .whl > "$OUT/build.txt" 2>&1 \
                   && python -c "from lora_kernels.ops.nf4_gemv import load_extension as l; import sys; sys.exit(not l())" \
                       >> "$OUT/build.txt" 2>&1; then
                   tail -3 "$OUT/build.txt"
               else
                   tail -5 "$OUT/build.txt"; rm -f lora_kernels/_C*.so
                   arch=$(python -c "import torch; print('%d%d' % torch.cuda.get_device_capability())")
                   # without ninja torch's BuildExtension compiles csrc/'s 15 files one after another
                   command -v ninja >/dev/null || python -c "import ninja" 2>/dev/null \
                       || echo "WARNING: no ninja: csrc/ builds serially (several minutes)" | tee -a "$OUT/build.txt"
                   LORA_KERNELS_CUDA_ARCHS=${LORA_KERNELS_CUDA_ARCHS:-$arch} timeout $(cap 400) python setup.py build_ext --inplace \
                       >> "$OUT/build.txt" 2>&1; tail -15 "$OUT/build.txt"
               fi
               python -c "from lora_kernels.ops.nf4_gemv import load_extension as l; print('lora_kernels._C loaded:', l())" \
                   2>&1 | tee -a "$OUT/build.txt" ;;
        sanitizer) PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout $(cap 300) compute-sanitizer --tool memcheck --error-exitcode 1 \
                       python -m pytest -q -x -p no:cacheprovider tests/ops/test_nf4_gemv.py -k cuda \
                       > "$OUT/sanitizer.txt" 2>&1; tail -15 "$OUT/sanitizer.txt" ;;
        csrc) timeout $(cap 240) python -m lora_kernels.tools.csrc_check --json "$OUT/csrc_check.json" 2>&1 \
                  | tee "$OUT/csrc_check.txt" ;;
        tests) $PYTEST_TIMEOUT $(cap 400) python -m pytest tests -q -p no:cacheprovider $XDIST --maxfail=10 --durations=15 \
                   -k "(cuda or dropout_hash) and not matches_float64_reference" --junitxml="$OUT/pytest.xml" \
                   > "$OUT/pytest.txt" 2>&1
               tail -40 "$OUT/pytest.txt" ;;
        tests-launch) # ops.launch's direct launches (first run on a GPU): bit for bit what kernel[grid] gives. If
                      # they do not, every later step launches through kernel[grid] (slower host side, same kernels).
                      $PYTEST_TIMEOUT $(cap 120) python -m pytest tests/ops/test_launch.py -q -p no:cacheprovider $XDIST -k cuda \
                          --junitxml="$OUT/pytest_launch.xml" > "$OUT/pytest_launch.txt" 2>&1 \
                          || { export LORA_KERNELS_FAST_LAUNCH=0; echo "FAST LAUNCH FAILED: LORA_KERNELS_FAST_LAUNCH=0 from here"; }
                      tail -15 "$OUT/pytest_launch.txt" ;;
        tests-graphs) # the layers captured in CUDA graphs (what removes the host time per call): replays equal eager calls;
                      # and no patched layer call makes the host wait for the GPU (torch.cuda sync debug mode)
                      $PYTEST_TIMEOUT $(cap 120) python -m pytest tests/modules/test_cuda_graphs.py tests/integrations/test_peft_patch.py -k "graphed or synchronizes" -q -p no:cacheprovider $XDIST \
                          --junitxml="$OUT/pytest_graphs.xml" > "$OUT/pytest_graphs.txt" 2>&1
                      tail -15 "$OUT/pytest_graphs.txt" ;;
        tests-gemv) # the GPU tests of the CUDA decode GEMVs (both kernels; after a change to csrc/), then of the
                    # slab decode by bitsandbytes' kernel (the large-M QLoRA forward's default; its first GPU run)
                    $PYTEST_TIMEOUT $(cap 120) python -m pytest tests/ops/test_nf4_gemv.py -q -p no:cacheprovider $XDIST \
                        --maxfail=10 -k cuda --junitxml="$OUT/pytest_gemv.xml" > "$OUT/pytest_gemv.txt" 2>&1
                    $PYTEST_TIMEOUT $(cap 60) python -m pytest tests/ops/test_bnb_dequantize.py -q -p no:cacheprovider \
                        --maxfail=10 --junitxml="$OUT/pytest_bnb_slabs.xml" > "$OUT/pytest_bnb_slabs.txt" 2>&1
                    tail -30 "$OUT/pytest_gemv.txt"; tail -8 "$OUT/pytest_bnb_slabs.txt" ;;
        tests-nf4) # the GPU tests of the NF4 GEMMs and their decode only (after a change to them)
                   $PYTEST_TIMEOUT $(cap 100) python -m pytest tests/kernels/test_nf4_tile.py tests/autograd/test_nf4_lora_linear.py \
                       tests/autograd/test_dora.py tests/integrations/test_peft_patch.py -q -p no:cacheprovider $XDIST --maxfail=10 \
                       -k "cuda and not matches_float64_reference" --junitxml="$OUT/pytest_nf4.xml" > "$OUT/pytest_nf4.txt" 2>&1
                   tail -30 "$OUT/pytest_nf4.txt" ;;
        tests-property) $PYTEST_TIMEOUT $(cap 400) python -m pytest tests/autograd -q -p no:cacheprovider $XDIST --maxfail=5 \
                            -k "cuda and matches_float64_reference" --junitxml="$OUT/pytest_property.xml" \
                            > "$OUT/pytest_property.txt" 2>&1
                        tail -40 "$OUT/pytest_property.txt" ;;
        tests-all) $PYTEST_TIMEOUT $(cap 560) python -m pytest tests -q -p no:cacheprovider $XDIST --maxfail=20 --durations=25 \
                       --junitxml="$OUT/pytest_all.xml" > "$OUT/pytest_all.txt" 2>&1
                   tail -40 "$OUT/pytest_all.txt" ;;
        memory) timeout $(cap 400) python -m lora_kernels memory --out "$OUT" 2>&1 | tee "$OUT/memory.txt"
                timeout $(cap 120) python -m lora_kernels memory --layer --out "$OUT" 2>&1 | tee "$OUT/memory_layer.txt" ;;
        bench) timeout $(cap 300) python -m lora_kernels bench --family dense --out "$OUT" 2>&1 | tee "$OUT/bench.txt" ;;
        bench-quick) # the dense goal rows (M = 8192 on the q, gate and down shapes of Llama-3 8B) and M = 16
                     timeout $(cap 150) python -m lora_kernels bench --family dense --quick --model 8b \
                         --proj q,gate,down --m 16,8192 --out "$OUT" 2>&1 | tee "$OUT/bench.txt" ;;
        train) timeout $(cap 300) python -m lora_kernels bench --train --out "$OUT" 2>&1 | tee "$OUT/train.txt" ;;
        train-routes) # 1B training steps with the opt-in routes beside their defaults (and PEFT)
                      timeout $(cap 240) python -m lora_kernels bench --train --variants peft,lora_kernels,lora_kernels_cublas,peft_qlora,lora_kernels_qlora,lora_kernels_qlora_cuda_decode,lora_kernels_qlora_triton_decode \
                          --out "$OUT/train_routes" 2>&1 | tee "$OUT/train.txt" ;;
        variants) timeout $(cap 240) python -m lora_kernels bench --family dense --model 8b --m 4096,8192 \
                      --providers lora_kernels,lora_kernels_dylora,lora_kernels_adalora,peft_dora,lora_kernels_dora,lora_kernels_wt,base --out "$OUT" 2>&1 \
                      | tee "$OUT/variants.txt" ;;
        dora) # PEFT DoRA vs the patched DoRA layers: saved activations / peak, then training steps
              timeout $(cap 150) python -m lora_kernels memory --dora --out "$OUT" 2>&1 | tee "$OUT/memory_dora.txt"
              timeout $(cap 240) python -m lora_kernels bench --train --dora --out "$OUT" 2>&1 | tee "$OUT/train_dora.txt" ;;
        gemv) timeout $(cap 240) python -m lora_kernels gemv --out "$OUT" 2>&1 | tee "$OUT/gemv.txt" ;;
        ncu-gemv) # checks csrc/README.md's predictions: DRAM throughput, shared-memory bank conflicts,
                  # issue-slot use of both decode GEMVs at M = 1 (two launches of each, 8192 x 28672)
                  timeout $(cap 240) ncu --target-processes all -k regex:nf4_gemv_.*kernel --launch-count 4 \
                      --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
                      --section Occupancy --metrics l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum \
                      python -m lora_kernels gemv --shapes 8192,28672 --m 1 --out "$OUT/ncu" \
                      > "$OUT/ncu_gemv.txt" 2>&1; tail -60 "$OUT/ncu_gemv.txt" ;;
        qlora|split-k) timeout $(cap 240) python -m lora_kernels "$step" --out "$OUT" 2>&1 | tee "$OUT/$step.txt" ;;
        qlora-quick) timeout $(cap 150) python -m lora_kernels qlora --quick --out "$OUT" 2>&1 | tee "$OUT/qlora.txt" ;;
        qlora-small-m) # the QLoRA layer at decode / small-batch M (issue 3: M 2-64): both CUDA GEMV kernels
                       # (up to 64 rows in launches of 16) against the slab and fused paths and PEFT + bnb, and
                       # fwd+bwd with the CUDA dX kernel
                       timeout $(cap 200) python -m lora_kernels qlora --quick --model 8b --proj q,gate,down \
                           --m 1,2,4,8,16,32,64 --modes fwd,fwdbwd --providers lora_kernels_nf4,lora_kernels_nf4_gemv,lora_kernels_nf4_gemv_mma,lora_kernels_nf4_cublas,lora_kernels_nf4_triton,lora_kernels_nf4_cuda_dx,peft_qlora,bnb_matmul_4bit \
                           --out "$OUT/qlora_small_m" 2>&1 | tee "$OUT/qlora_small_m.txt" ;;
        overhead) # host time per layer call (a decode step and a 1B-model projection), PEFT vs patched
                  timeout $(cap 120) python -m lora_kernels overhead --out "$OUT" 2>&1 | tee "$OUT/overhead.txt" ;;
        *) echo "unknown step $step" ;;
    esac
    SUMMARY+=("$step: $((SECONDS - step_start)) s")
    archive
done
{
echo "=== summary ($SECONDS s; results in $OUT${ARCHIVE:+, archived in \$OUT/device-run.tar.gz})"
printf '  %s\n' "${SUMMARY[@]}"
# key lines: the extension, pytest and sanitizer totals, goal checks (with the misses), ceilings
grep -h "lora_kernels._C loaded" "$OUT"/build.txt 2>/dev/null
for f in "$OUT"/pytest*.txt; do [ -f "$f" ] && echo "$(basename "$f"): $(grep -E "passed|failed|error" "$f" | tail -1)"; done
grep -h "ERROR SUMMARY" "$OUT"/sanitizer.txt 2>/dev/null
grep -h -A6 -E "goals" "$OUT"/{bench,qlora,gemv,train}.txt 2>/dev/null | grep -v "^--$" | head -40
grep -h -E "fwdbwd|infer" "$OUT"/overhead.txt 2>/dev/null | head -24
# the opt-in routes beside their defaults (python -m lora_kernels routes), from every result file of this run
python -m lora_kernels routes --results "$OUT" 2>&1 | tail -40
} 2>&1 | tee "$OUT/summary.txt"
archive
[ -n "$ARCHIVE" ] && cp "$OUT/summary.txt" "$ARCHIVE/"
true
