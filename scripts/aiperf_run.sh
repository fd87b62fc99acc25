#!/usr/bin/env bash
# NVIDIA's aiperf (pip install -e '.[serve,bench]') against the OpenAI front end of the served
# embedded checkpoint, offline, on 127.0.0.1: one short bounded run per mode (streamed completions,
# synthetic prompts of ISL tokens, OSL tokens each, ignore_eos so every request runs to OSL), token
# counts with the checkpoint's own tokenizer (the engine dir's copy). aiperf's summary exports go
# to DOCS/<mode>/, everything else (engine, repo, logs, full artifacts) under WORK.
#   scripts/aiperf_run.sh                   # defaults below; override any of them from the environment
#   MODES=ar REQUESTS=4 scripts/aiperf_run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
WORK=${WORK:-out/aiperf}
DOCS=${DOCS:-docs/aiperf}
MODES=${MODES:-ar diffusion self_spec}
REQUESTS=${REQUESTS:-8}
CONCURRENCY=${CONCURRENCY:-2}
ISL=${ISL:-32}
OSL=${OSL:-32}
ENDPOINT=${ENDPOINT:-completions}   # or chat (the server applies the checkpoint's chat template)
# Offline, but not through HF_HUB_OFFLINE: with it, aiperf 0.13.0 looks --tokenizer up as a Hub repo id in
# the HF cache only (snapshot_download(local_files_only=True)), so a local directory fails with "Repo id
# must be in the form 'repo_name' or 'namespace/repo_name'". Without it, aiperf and transformers read a
# local directory directly; the Hub endpoint is a closed local port, so any Hub access would fail.
unset HF_HUB_OFFLINE TRANSFORMERS_OFFLINE
export HF_ENDPOINT=http://127.0.0.1:9 HF_DATASETS_OFFLINE=1
trimode=$VENV/bin/trimode
mkdir -p "$WORK"

# the engine (~3-5 min on 2 CPU cores) and the repository are reused when already there
[ -f "$WORK/engine/manifest.json" ] || $trimode build --out "$WORK/engine" --max-batch-size 4 --max-seq-len 256
[ -f "$WORK/repo/manifest.json" ] || $trimode repo "$WORK/engine" --out "$WORK/repo"

read -r HTTP GRPC METRICS OPENAI < <($VENV/bin/python -c "from trimode.triton_repo.server import Ports
p, q = Ports.free(), Ports.free(); print(p.http, p.grpc, p.metrics, q.http)")
$trimode serve "$WORK/repo" --http-port "$HTTP" --grpc-port "$GRPC" --metrics-port "$METRICS" \
  --openai-port "$OPENAI" > "$WORK/serve.log" 2>&1 &
SERVE=$!
trap 'kill -TERM $SERVE 2>/dev/null; wait $SERVE 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  grep -q "OpenAI http" "$WORK/serve.log" && break
  kill -0 $SERVE 2>/dev/null || { tail -5 "$WORK/serve.log"; exit 1; }
  sleep 0.5
done
grep "OpenAI http" "$WORK/serve.log"

for mode in $MODES; do
  rm -rf "$WORK/runs/$mode"
  $VENV/bin/aiperf profile --model "$mode" --url "http://127.0.0.1:$OPENAI" --endpoint-type "$ENDPOINT" \
    --streaming --tokenizer "$(realpath "$WORK/engine/checkpoint")" \
    --request-count "$REQUESTS" --concurrency "$CONCURRENCY" --warmup-request-count 1 \
    --synthetic-input-tokens-mean "$ISL" --synthetic-input-tokens-stddev 0 \
    --output-tokens-mean "$OSL" --output-tokens-stddev 0 --extra-inputs ignore_eos:true \
    --random-seed 0 --ui-type none --no-server-metrics --no-gpu-telemetry \
    --output-artifact-dir "$WORK/runs/$mode"
  mkdir -p "$DOCS/$mode"
  find "$WORK/runs/$mode" -maxdepth 2 \( -name 'profile_export_aiperf.json' -o -name 'profile_export_aiperf.csv' \) \
    -exec cp {} "$DOCS/$mode/" \;
done
