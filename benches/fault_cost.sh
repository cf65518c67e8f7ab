#!/usr/bin/env bash
# Instructions per 4 KiB fault, counted by callgrind (stable whatever the
# machine's load): two demand-paging runs that differ only in size, so
# everything that does not scale with the faults (start-up, teardown)
# cancels out. Reports the MMU's fault path inclusive, the machine model's
# host side called from it (the host page lookup, its release and the host
# mapping level), and the
# MMU's own instructions (the difference), plus the two biggest parts.
#
#   bash benches/fault_cost.sh            # builds the release binary first
#   SMALL=16M LARGE=64M bash benches/fault_cost.sh
#   QUICK=1 bash benches/fault_cost.sh    # the 4 KiB fault and the zap only
set -euo pipefail
cd "$(dirname "$0")/.."
SMALL=${SMALL:-16M}
LARGE=${LARGE:-64M}
command -v valgrind >/dev/null || { echo "fault_cost.sh: valgrind is needed (valgrind --tool=callgrind)" >&2; exit 1; }
cargo build --release -q -p vmmu-cli
BIN=target/release/vmmu
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
faults() { "$BIN" run demand-paging -v 1 -b "$1" --no-oracle --prefault-host --json | sed -n 's/.*"faults":\([0-9]*\).*/\1/p'; }
for b in "$SMALL" "$LARGE"; do
  valgrind --tool=callgrind --callgrind-out-file="$OUT/cg.$b" \
    "$BIN" run demand-paging -v 1 -b "$b" --no-oracle --prefault-host >/dev/null 2>"$OUT/vg.$b"
  callgrind_annotate --inclusive=yes --threshold=100 "$OUT/cg.$b" 2>/dev/null >"$OUT/an.$b"
done
# What calling the function whose name ends with $2 cost in run $1: the
# inclusive cost of every call to it, summed over its call sites (the
# "=> callee (Nx)" lines), so code inlined into it is counted once.
incl() {
  grep -E "=> .*$2 \([0-9,]+x\)" "$OUT/an.$1" | awk '{gsub(",", "", $1); s += $1} END { print s + 0 }'
}
# The same, counting only the calls made from the MMU's own source (the
# host side the MMU asks for, not the machine's own use of its host).
incl_mmu() {
  awk -v pat="=> .*$2 \\([0-9,]+x\\)" '
    /^-- Auto-annotated source:/ { mmu = ($0 ~ /crates\/vmmu\/src\//) }
    mmu && $0 ~ pat { gsub(",", "", $1); s += $1 }
    END { print s + 0 }' "$OUT/an.$1"
}
fs=$(faults "$SMALL"); fl=$(faults "$LARGE")
n=$((fl - fs))
per() { awk -v a="$(incl "$SMALL" "$1")" -v b="$(incl "$LARGE" "$1")" -v n="$n" 'BEGIN { printf "%.0f", (b - a) / n }'; }
per_mmu() { awk -v a="$(incl_mmu "$SMALL" "$1")" -v b="$(incl_mmu "$LARGE" "$1")" -v n="$n" 'BEGIN { printf "%.0f", (b - a) / n }'; }
fault=$(per "VcpuMmu>::page_fault")
host=$(per_mmu "PrimaryMmu>::faultin")
release=$(per_mmu "PrimaryMmu>::release")
# The host's mapping level (KVM reads the host page tables for it).
level=$(per_mmu "PrimaryMmu>::mapping_level")
map=$(per "Tdp>::map")
adjust=$(per "VcpuMmu>::hugepage_adjust")
# The run ends by deleting the populated slot: a fast zap of the roots,
# whose zapping walk takes every leaf (one per fault here).
zap=$(per "Tdp>::zap_invalidated_roots")
echo "Instructions per 4 KiB fault (callgrind; demand-paging -v 1, $SMALL vs $LARGE, host memory pre-touched, $n faults apart):"
echo "  MMU fault path, inclusive (VcpuMmu::page_fault):   $fault"
echo "  machine model's host side (faultin, release, mapping level): $((host + release + level))"
echo "  MMU's own:                                         $((fault - host - release - level))"
if [ "$map" -gt 0 ]; then
  echo "    of which tdp::map:                               $map"
else
  echo "    (tdp::map is inlined into page_fault: not counted apart)"
fi
if [ "$adjust" -gt 0 ]; then
  echo "    of which hugepage_adjust, less the host level:   $((adjust - level))"
else
  echo "    (hugepage_adjust and faultin_pfn are inlined into page_fault: not counted apart)"
fi
echo "Instructions per zapped 4 KiB leaf (the slot delete's zap of the roots): $zap"
if [ -n "${QUICK:-}" ]; then
  echo "CPU: $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1); commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  exit 0
fi
# Memslot lookups: every call in the $LARGE run (the lookup is never inlined
# so it can be counted), its inclusive cost per call and calls per fault.
calls() {
  grep -E "=> .*$2 \([0-9,]+x\)" "$OUT/an.$1" | awk '{
      gsub(",", "", $1); s += $1
      match($0, /\([0-9,]+x\)/); c = substr($0, RSTART + 1, RLENGTH - 3); gsub(",", "", c); n += c
    } END { printf "%d %d", s, n }'
}
read -r lk_cost lk_n <<<"$(calls "$LARGE" "MemslotSet::lookup")"
awk -v s="$lk_cost" -v n="$lk_n" -v f="$fl" 'BEGIN {
  printf "Memslot lookups (%s run): %.0f instructions each, %.2f per fault (%d calls)\n", "'"$LARGE"'", n ? s / n : 0, n / f, n }'
# Fast-path fixes: dirty-log-perf's write passes over write-protected pages
# (64M, 2 vs 6 iterations: every extra fault is one fix).
fixes() { "$BIN" run dirty-log-perf -v 1 -b 64M -i "$1" --no-oracle --json | sed -n 's/.*"fast_path_fixes":\([0-9]*\).*/\1/p'; }
for i in 2 6; do
  valgrind --tool=callgrind --callgrind-out-file="$OUT/cg.f$i" \
    "$BIN" run dirty-log-perf -v 1 -b 64M -i "$i" --no-oracle >/dev/null 2>"$OUT/vg.f$i"
  callgrind_annotate --inclusive=yes --threshold=100 "$OUT/cg.f$i" 2>/dev/null >"$OUT/an.f$i"
done
fn=$(( $(fixes 6) - $(fixes 2) ))
awk -v a="$(incl f2 "VcpuMmu>::page_fault")" -v b="$(incl f6 "VcpuMmu>::page_fault")" -v n="$fn" \
  'BEGIN { printf "Instructions per fast-path fix (a write to a write-protected page of a logged slot, %d fixes apart): %.0f\n", n, (b - a) / n }'
# 2 MiB faults: 2 MiB host pages (hugetlb backing), 64M vs 256M.
for b in 64M 256M; do
  valgrind --tool=callgrind --callgrind-out-file="$OUT/cg.h$b" \
    "$BIN" run demand-paging -v 1 -b "$b" -s anonymous_hugetlb --no-oracle --prefault-host >/dev/null 2>"$OUT/vg.h$b"
  callgrind_annotate --inclusive=yes --threshold=100 "$OUT/cg.h$b" 2>/dev/null >"$OUT/an.h$b"
done
hfaults() { "$BIN" run demand-paging -v 1 -b "$1" -s anonymous_hugetlb --no-oracle --prefault-host --json | sed -n 's/.*"faults":\([0-9]*\).*/\1/p'; }
hn=$(( $(hfaults 256M) - $(hfaults 64M) ))
hper() { awk -v a="$(incl h64M "$1")" -v b="$(incl h256M "$1")" -v n="$hn" 'BEGIN { printf "%.0f", (b - a) / n }'; }
hper_mmu() { awk -v a="$(incl_mmu h64M "$1")" -v b="$(incl_mmu h256M "$1")" -v n="$hn" 'BEGIN { printf "%.0f", (b - a) / n }'; }
hfault=$(hper "VcpuMmu>::page_fault")
hhost=$(( $(hper_mmu "PrimaryMmu>::faultin") + $(hper_mmu "PrimaryMmu>::release") + $(hper_mmu "PrimaryMmu>::mapping_level") ))
echo "Instructions per 2 MiB fault ($hn faults apart): MMU path $hfault, host side $hhost, MMU's own $((hfault - hhost))"
# A 256 GiB guest (one memslot, host memory reserved, touched sparsely):
# a dense window at its start ($SMALL vs $LARGE, as the 4 KiB figure above),
# and one 4 KiB page every 2 MiB (32G vs 128G of it touched: every fault
# also makes its last-level table).
sparse() {
  local tag=$1; shift
  valgrind --tool=callgrind --callgrind-out-file="$OUT/cg.$tag" \
    "$BIN" run demand-paging -v 1 -b 256G "$@" --no-oracle --prefault-host >/dev/null 2>"$OUT/vg.$tag"
  callgrind_annotate --inclusive=yes --threshold=100 "$OUT/cg.$tag" 2>/dev/null >"$OUT/an.$tag"
  "$BIN" run demand-paging -v 1 -b 256G "$@" --no-oracle --prefault-host --json | sed -n 's/.*"faults":\([0-9]*\).*/\1/p' >"$OUT/faults.$tag"
}
sparse_per() { awk -v a="$(incl "$1" "VcpuMmu>::page_fault")" -v b="$(incl "$2" "VcpuMmu>::page_fault")" \
  -v n="$(( $(cat "$OUT/faults.$2") - $(cat "$OUT/faults.$1") ))" 'BEGIN { printf "%.0f", (b - a) / n }'; }
sparse ws --touch "$SMALL"; sparse wl --touch "$LARGE"
sparse ss --stride 2M --touch 32G; sparse sl --stride 2M --touch 128G
echo "256 GiB guest, MMU fault path per 4 KiB fault (inclusive, as the first line above: $fault):"
echo "  dense window at its start ($SMALL vs $LARGE): $(sparse_per ws wl)"
echo "  one page per 2 MiB (32G vs 128G touched):  $(sparse_per ss sl)"
echo "CPU: $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1); commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
