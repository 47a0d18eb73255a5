#!/usr/bin/env bash
# Every GPU check in one call of under 10 minutes (bench/device_check.py lists them), one
# markdown table: $OUT/device_check.md.
#
#   bash bench/device_check.sh --prepare   # here, once: .device/ = wheels + data (< 64 MiB)
#   bash bench/device_check.sh --dry-run   # here: every step on CPU with tiny sizes (a test)
#   bash bench/device_check.sh             # on the lent GPU: device run, carry [".device"]
#
# The device has torch and most of our dependencies but not deepspeed, tyro, schedulefree
# (and theirs), nor ../shared: --prepare downloads those wheels (deepspeed's built here, pure
# Python, its ops compiled there on first use) and packs the data. CIFAR-10 does not fit
# whole: it carries data_batch_1 and the test batch, and on the device data_batch_2..5 are
# data_batch_1 again, so an epoch has 50,000 images (the paper's seconds per epoch) but only
# 10,000 distinct ones (its accuracy is below the paper's; the table says so).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device_check}
SHARED=${SHARED:-../shared/data}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"

case "${1:-}" in
--prepare)
    rm -rf .device && mkdir -p .device/whl .device/cifar .device/wikitext-2 || exit 1
    grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo /.device/ >> .git/info/exclude
    pip=(.venv/bin/python -m pip)
    version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
    wheels=()
    for name in tyro docstring-parser typeguard schedulefree hjson pydantic pydantic-core \
                annotated-types typing-inspection; do
        wheels+=("$name==$(version "$name")")
    done
    "${pip[@]}" download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .device/whl "${wheels[@]}" || exit 1
    DS_BUILD_OPS=0 "${pip[@]}" wheel -q --no-deps --no-build-isolation -w .device/whl \
        "deepspeed==$(version deepspeed)" || exit 1
    # xz, not the gzip they come in: 23 MB a CIFAR-10 file instead of 28, so the two fit.
    for name in data_batch_1 test_batch; do
        gunzip -c "$SHARED/cifar-10-batches-bin/$name.bin.gz" | xz -9 -T2 > ".device/cifar/$name.bin.xz" || exit 1
    done
    for f in "$SHARED"/wikitext-2/*.txt; do xz -9c "$f" > ".device/wikitext-2/$(basename "$f").xz" || exit 1; done
    size=$(du -sb .device | cut -f1)
    echo ".device: $((size / 1048576)) MiB of the 64 MiB a device call carries"
    (( size < 60 * 1048576 )) || { echo "too large to carry"; exit 1; }
    exit 0 ;;
--dry-run)
    exec "$PYTHON" bench/device_check.py --dry-run --cifar "$SHARED/cifar-10-batches-bin" \
        --wikitext "$SHARED/wikitext-2" --out "$OUT" ;;
"") ;;
*) echo "usage: bash bench/device_check.sh [--prepare | --dry-run]"; exit 2 ;;
esac

[[ -d .device/whl ]] || { echo "no .device/: run bash bench/device_check.sh --prepare here and carry .device"; exit 2; }
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .device/whl/*.whl || exit 1
data=/tmp/device_data
mkdir -p "$data/cifar" "$data/wikitext-2"
unxz() { "$PYTHON" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$@"; }
for name in data_batch_1 test_batch; do unxz ".device/cifar/$name.bin.xz" "$data/cifar/$name.bin" || exit 1; done
for i in 2 3 4 5; do ln -sf data_batch_1.bin "$data/cifar/data_batch_$i.bin"; done
for f in .device/wikitext-2/*.xz; do unxz "$f" "$data/wikitext-2/$(basename "$f" .xz)" || exit 1; done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
exec "$PYTHON" bench/device_check.py --cifar "$data/cifar" --wikitext "$data/wikitext-2" --out "$OUT"
