#!/usr/bin/env bash
# The wheels a GPU lease carries in .whl/ (git-ignored; `carry: [".whl"]`, installed by bench/lease.sh): what fpt
# and its benches need that the GPU machines' image lacks (the device library's KINDS.md list, read 2026-11-17),
# at this checkout's venv versions, for CPython 3.12 on manylinux x86_64. py-spy (not a dependency of fpt) lets
# the lease sample which threads hold the interpreter lock (fpt.bench.gil).
#
#   bash bench/wheels.sh            # here, before a lease; then `du -sh .whl` (a call carries at most 64 MiB)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
NAMES="zarr numcodecs donfig crc32c google-crc32c dask distributed partd locket tblib tornado zict pydicom openpyxl
       et-xmlfile py-spy"                                  # (the lease's steps decode no compressed DICOM)
specs=()
for name in $NAMES; do          # the venv's version where it has the package, else the newest
  version=$("$PY" -c "import importlib.metadata as m; print(m.version('$name'))" 2>/dev/null || true)
  specs+=("$name${version:+==$version}")
done
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
  -d .whl "${specs[@]}" 2> >(grep -v "^WARNING: Location" >&2)
ls .whl
