#!/usr/bin/env bash
# ../shared/device/pack.sh with 40 MiB chunks (CHUNK_MB): the working tree (15 MiB on 2026-12-07 with
# the committed result ledgers) plus a 56 MiB chunk, and since then a 48 MiB one, is over the 64 MiB
# a transfer takes. Same arguments, same output
# (.devcarry/1..K and .devcarry/tools); e.g. scripts/device/pack.sh ray==2.60.0
set -euo pipefail
shared=$(cd "$(dirname "$0")/../../../shared/device" && pwd)
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
chunk=${CHUNK_MB:-40}
sed -e "s/split -b 56M/split -b ${chunk}M/" -e "s|here=\$(dirname \"\$(readlink -f \"\$0\")\")|here=$shared|" "$shared/pack.sh" > "$tmp"
grep -q "split -b ${chunk}M" "$tmp" || { echo "scripts/device/pack.sh: $shared/pack.sh no longer splits at 56M; check it" >&2; exit 1; }
bash "$tmp" "$@"
