#!/usr/bin/env bash
# Every GPU-only check, for a session that draws an H100/H200 (under 5 minutes; see README "GPU checks").
#   1. the kernel tests on CUDA (the same files CPU CI runs under TRITON_INTERPRET=1),
#   2. scripts/bench_kernels.py: the kernels against SDPA / flex_attention / torch at 8B-like shapes,
#   3. scripts/gpu_check.py: the FP8 GEMM against its simulation, self-spec == AR on CUDA, the host
#      syncs of an async AR step,
#   4. the CUDA torch engine: `trimode build --device cuda` (its self-test is the parity check against
#      the eager model in every mode, through its CUDA graphs), then scripts/bench_engine.py (engine vs
#      eager vs transformers),
#   5. scripts/bench_host.py on that engine: CUDA graphs and async AR steps on, then each off,
#   6. `trimode bench` of that engine: auto against ar, self-spec and quadratic at concurrency 1 and 8,
#      saving the fixed modes' step times with the engine (step_times.json, copied to the results).
# Results land in $OUT (the device tool's folder) or out/gpu: *.json and the logs.
# Usage, from the repository root on the GPU machine:  bash scripts/gpu_check.sh
set -uo pipefail
out=${OUT:-out/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
py=${PYTHON:-python3}
# The image has torch, triton, pytest, safetensors, tokenizers, click, tqdm; install only our package.
$py -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$out/install.log" 2>&1 \
  || { echo "install failed, see $out/install.log"; tail -5 "$out/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
$py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
status=0
timeout 120 $py -m pytest -q -p no:cacheprovider tests/test_kernels_attention.py tests/test_kernels_sampling.py \
  tests/test_kernels_decoding.py 2>&1 | tee "$out/kernel_tests.log" | tail -15 || status=1
timeout 90 $py scripts/bench_kernels.py --json "$out/bench_kernels.json" >"$out/bench_kernels.log" 2>&1 || status=1
timeout 60 $py scripts/gpu_check.py --json "$out/gpu_check.json" >"$out/gpu_check.log" 2>&1 || status=1
engine=$(mktemp -d)/engine  # not under $OUT: its programs are large and only the JSON matters
timeout 150 $py -m trimode.cli build --device cuda --out "$engine" --max-seq-len 512 --json \
  >"$out/engine_build.json" 2>"$out/engine_build.log" || { status=1; tail -3 "$out/engine_build.log"; }
[ -d "$engine" ] && { timeout 90 $py scripts/bench_engine.py --engine "$engine" --repeats 2 --pass-repeats 10 \
  --json "$out/bench_engine.json" >/dev/null 2>"$out/bench_engine.log" || status=1; tail -12 "$out/bench_engine.log"; }
# 5. CUDA graphs (builder/pass_graphs.py) and async AR steps (decoding/ar.py): the build's self-test above
#    ran both against the eager model; here the engine's us per step with both (the default), without
#    graphs and without async steps (bench_host's load re-checks the self-test tokens each time).
for run in "default" "TRIMODE_PASS_GRAPHS=0" "TRIMODE_ASYNC_STEPS=0"; do
  [ -d "$engine" ] && { env ${run/default/} timeout 60 $py scripts/bench_host.py --engine "$engine" \
    --modes ar,self-spec --batch-sizes 1,4 --requests 2 --max-tokens 32 --json "$out/bench_host_${run%%=*}.json" \
    >/dev/null 2>"$out/bench_host_${run%%=*}.log" || status=1; echo "$run:"; tail -5 "$out/bench_host_${run%%=*}.log"; }
done
# 6. auto >= the best fixed mode and >= AR (issue spec-v2), where switching costs about nothing
[ -d "$engine" ] && { timeout 90 $py -m trimode.cli bench --engine "$engine" --modes ar,self-spec,quadratic,auto \
  --concurrency 1,8 --requests 16 --repeats 2 --max-tokens 64 --save-step-times --json >"$out/bench_auto.json" \
  2>"$out/bench_auto.log" || status=1; cp "$engine/step_times.json" "$out/" 2>/dev/null; }
$py - "$out" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
for name in ("bench_kernels.json", "gpu_check.json"):
    path = out / name
    if not path.exists():
        print(f"{name}: missing (see the .log beside it)")
        continue
    report = json.loads(path.read_text())
    for row in report.get("rows", []):
        keys = ("op", "batch", "prefix", "L", "pattern", "kernel_us", "reference_us", "sdpa_us", "flex_us", "speedup")
        print(" ".join(f"{k}={row[k]}" for k in keys if k in row))
    for key in ("invariant", "async_steps"):
        if key in report:
            print(key, report[key])
bench = out / "bench_auto.json"
if bench.exists():
    for row in json.loads(bench.read_text())["results"]:
        print(row["variant"], "c=%d" % row["concurrency"], row["tokens_per_s"], "tok/s", row["speedup_vs_ar"], "x AR")
    print(*json.loads(bench.read_text())["notes"], sep="\n")
PY
exit $status
