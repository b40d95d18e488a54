#!/usr/bin/env bash
# The GPU-shaped figures in one short run on a lent GPU machine: prefill-cost-ratio (issue 3),
# apply-ratio (issue 4) and validation-cost-ratio (issue 7), with the node and the validator on
# the GPU in bf16. That machine's image has torch, transformers, numpy, grpcio and safetensors
# but not the rest of rollproof's dependencies, and nothing can be fetched there:
#
#   bench/gpu.sh wheels   here: download those as Python 3.12 wheels into .whl/ (about 26 MB;
#                         .whl/ is git-ignored through .git/info/exclude)
#   bench/gpu.sh run      there, with .whl carried: install them to /tmp/site, run the benches,
#                         logs under $OUT (or /tmp/rollproof-gpu-logs). DEVICE=cpu runs the same commands here,
#                         QUICK=1 with small sizes.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(zstandard==0.25.0 cryptography==51.0.1 cffi==2.1.1 pycparser==3.12 pydantic==2.14.4
        pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 pydantic-settings==2.16.3
        python-dotenv==1.2.4 SQLAlchemy==2.1.9 greenlet==3.5.6 alembic==1.20.1 Mako==1.4.3
        starlette==1.10.0 uvicorn==0.54.0 fastapi==0.165.0 protobuf==6.33.6 grpcio==1.81.1)

case "${1:-}" in
    wheels)
        grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
        for wheel in "${WHEELS[@]}"; do
            python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
                --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
                -d .whl "$wheel"
        done
        du -sh .whl
        ;;
    run)
        PYTHON=${PYTHON:-python3}
        DEVICE=${DEVICE:-cuda}
        LOGS=${OUT:-/tmp/rollproof-gpu-logs}
        mkdir -p "$LOGS"
        if [ -d .whl ]; then
            "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
            export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
        fi
        export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
        if [ -n "${QUICK:-}" ]; then
            engine=(--quick) validation=(--quick) weights=(--quick)
        else
            engine=(--hidden-size 1024 --num-layers 8 --vocab-size 32000 --batch-size 64 --max-tokens 256 --repeats 3)
            validation=(--hidden-size 1024 --num-layers 8 --max-tokens 64)
            weights=()
        fi
        "$PYTHON" bench/engine.py --device "$DEVICE" --dtype bfloat16 "${engine[@]}" 2>&1 | tee "$LOGS/engine.log"
        "$PYTHON" bench/validation.py --device "$DEVICE" --dtype bfloat16 "${validation[@]}" 2>&1 | tee "$LOGS/validation.log"
        "$PYTHON" bench/weights.py --device "$DEVICE" "${weights[@]}" 2>&1 | tee "$LOGS/weights.log"
        ;;
    *)
        echo "usage: bench/gpu.sh wheels | bench/gpu.sh run" >&2
        exit 2
        ;;
esac
