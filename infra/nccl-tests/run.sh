#!/usr/bin/env bash
# Pre-flight check of the interconnect weight sync runs on: NVIDIA nccl-tests' broadcast and all-reduce over a sweep
# of message sizes on this node's GPUs (or across nodes with mpirun), a compact report of the bus bandwidth, a JSON
# summary, and a non-zero exit when the bandwidth is below what the run needs.
#
#   infra/nccl-tests/run.sh [--min-busbw GB/s] [options]
#
# Weight sync is a broadcast from the learner to every engine (vLLM's NCCL weight-transfer engine), in buckets of
# learner.sync_bucket_mib; the all-reduce is what an FSDP learner does every step. "busbw" is nccl-tests' bus
# bandwidth: algorithm bandwidth corrected by the collective's traffic factor, comparable to the hardware's peak
# (NVLink H100 ≈ 370-450 GB/s all-reduce within a node; 400 Gb/s InfiniBand ≈ 45-48 GB/s across nodes).
# The check compares the peak busbw over the sizes from --check-from up (small messages are latency-bound and say
# nothing about a multi-GB sync).
#
# Options:
#   --min-busbw GBPS     fail (exit 1) if either collective's peak busbw is below GBPS (default 0: report only)
#   --gpus N             GPUs per node (default: all that nvidia-smi lists)
#   --min-bytes SIZE     smallest message (default 1M)       sizes take nccl-tests' suffixes: K, M, G
#   --max-bytes SIZE     largest message (default 4G; at least the sync bucket)
#   --check-from SIZE    smallest message the threshold applies to (default 64M)
#   --hosts H1,H2,...    run across these nodes with mpirun (each with --gpus GPUs; needs an MPI build)
#   --iters N            timed iterations per size (default 20)
#   --json FILE          also write the JSON summary to FILE (it is always printed last on stdout)
#   --nccl-tests-dir D   where nccl-tests is, or is to be built (default $NCCL_TESTS_DIR, else ~/.cache/nccl-tests)
#   --build-only         build nccl-tests and stop
#
# Building: if D/build/{all_reduce,broadcast}_perf are missing, nccl-tests is built from source in D (a checkout
# there, else `git clone` of github.com/NVIDIA/nccl-tests) with `make MPI=0|1 CUDA_HOME=$CUDA_HOME` (MPI=1 with
# --hosts, MPI_HOME from `mpicc`); NCCL_HOME is passed when set. The longhaul image (infra/docker/Dockerfile) has it
# prebuilt in /opt/nccl-tests.
set -euo pipefail

min_busbw=0
gpus=""
min_bytes=1M
max_bytes=4G
check_from=64M
hosts=""
iters=20
json_out=""
build_only=0
tests_dir="${NCCL_TESTS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/nccl-tests}"

die() { echo "nccl-tests: $*" >&2; exit 2; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-0}"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --min-busbw) min_busbw="${2:?--min-busbw needs GB/s}"; shift 2 ;;
    --gpus) gpus="${2:?--gpus needs a count}"; shift 2 ;;
    --min-bytes) min_bytes="${2:?}"; shift 2 ;;
    --max-bytes) max_bytes="${2:?}"; shift 2 ;;
    --check-from) check_from="${2:?}"; shift 2 ;;
    --hosts) hosts="${2:?--hosts needs H1,H2,...}"; shift 2 ;;
    --iters) iters="${2:?}"; shift 2 ;;
    --json) json_out="${2:?--json needs a file}"; shift 2 ;;
    --nccl-tests-dir) tests_dir="${2:?}"; shift 2 ;;
    --build-only) build_only=1; shift ;;
    -h|--help) usage 0 ;;
    *) echo "nccl-tests: unknown argument '$1'" >&2; usage 2 >&2 ;;
  esac
done
[[ "$min_busbw" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--min-busbw must be a number of GB/s, got '$min_busbw'"
[[ "$iters" =~ ^[1-9][0-9]*$ ]] || die "--iters must be a positive integer, got '$iters'"
command -v python3 >/dev/null || die "python3 is needed to parse the results"

to_bytes() {  # nccl-tests' size syntax (1M, 4G, 512K, 1024) to bytes, for comparisons
  local n="${1%[KkMmGg]}" unit="${1: -1}"
  [[ "$n" =~ ^[0-9]+$ ]] || die "bad size '$1' (use e.g. 1024, 64K, 1M, 4G)"
  case "$unit" in K|k) echo $((n << 10)) ;; M|m) echo $((n << 20)) ;; G|g) echo $((n << 30)) ;; *) echo "$n" ;; esac
}
check_from_bytes=$(to_bytes "$check_from")
(( $(to_bytes "$min_bytes") <= $(to_bytes "$max_bytes") )) || die "--min-bytes $min_bytes exceeds --max-bytes $max_bytes"

if [[ -z "$gpus" ]]; then
  command -v nvidia-smi >/dev/null || die "nvidia-smi not found: is this a GPU node? (or pass --gpus N)"
  gpus=$(nvidia-smi -L | grep -c '^GPU ' || true)
fi
[[ "$gpus" =~ ^[1-9][0-9]*$ ]] || die "no GPU found (nvidia-smi -L lists none); pass --gpus N"

mpi=0
[[ -n "$hosts" ]] && mpi=1

build() {
  local cuda_home="${CUDA_HOME:-/usr/local/cuda}"
  [[ -x "$cuda_home/bin/nvcc" ]] || die "no nvcc in CUDA_HOME=$cuda_home: set CUDA_HOME to a CUDA toolkit to build nccl-tests"
  if [[ ! -f "$tests_dir/Makefile" ]]; then
    command -v git >/dev/null || die "git is needed to fetch nccl-tests into $tests_dir (or check it out there yourself)"
    echo "nccl-tests: cloning into $tests_dir" >&2
    git clone --depth 1 https://github.com/NVIDIA/nccl-tests.git "$tests_dir" >&2
  fi
  local args=(MPI="$mpi" CUDA_HOME="$cuda_home")
  [[ -n "${NCCL_HOME:-}" ]] && args+=(NCCL_HOME="$NCCL_HOME")
  if [[ "$mpi" == 1 ]]; then
    command -v mpicc >/dev/null || die "--hosts needs an MPI build of nccl-tests: install OpenMPI (mpicc, mpirun)"
    args+=(MPI_HOME="$(dirname "$(dirname "$(command -v mpicc)")")")
  fi
  echo "nccl-tests: make ${args[*]} in $tests_dir" >&2
  make -C "$tests_dir" -j"$(nproc)" "${args[@]}" >&2
}

bin_dir="$tests_dir/build"
if [[ ! -x "$bin_dir/all_reduce_perf" || ! -x "$bin_dir/broadcast_perf" ]]; then
  build
fi
[[ -x "$bin_dir/all_reduce_perf" && -x "$bin_dir/broadcast_perf" ]] || die "build did not produce $bin_dir/*_perf"
[[ "$build_only" == 1 ]] && { echo "nccl-tests: built in $bin_dir"; exit 0; }

logs=$(mktemp -d "${TMPDIR:-/tmp}/nccl-tests.XXXXXX")
trap 'rm -rf "$logs"' EXIT

run_one() {  # $1: collective (all_reduce, broadcast); output to $logs/$1.log
  local common=(-b "$min_bytes" -e "$max_bytes" -f 2 -n "$iters" -w 5 -c 1)
  if [[ "$mpi" == 1 ]]; then
    command -v mpirun >/dev/null || die "--hosts needs mpirun (OpenMPI)"
    local host_list="" host
    IFS=, read -r -a host_array <<< "$hosts"
    for host in "${host_array[@]}"; do host_list+="${host_list:+,}$host:$gpus"; done
    mpirun --allow-run-as-root -np $(( ${#host_array[@]} * gpus )) -H "$host_list" --bind-to none \
      -x PATH -x LD_LIBRARY_PATH -x NCCL_DEBUG -x NCCL_SOCKET_IFNAME -x NCCL_IB_HCA \
      "$bin_dir/${1}_perf" "${common[@]}" -g 1 > "$logs/$1.log" 2>&1
  else
    "$bin_dir/${1}_perf" "${common[@]}" -g "$gpus" > "$logs/$1.log" 2>&1
  fi
}

where="1 node × $gpus GPU(s)"
[[ "$mpi" == 1 ]] && where="$(tr ',' '\n' <<< "$hosts" | wc -l) nodes × $gpus GPU(s) ($hosts)"
echo "nccl-tests: broadcast and all-reduce, $min_bytes..$max_bytes, on $where" >&2
for collective in broadcast all_reduce; do
  if ! run_one "$collective"; then
    cat "$logs/$collective.log" >&2
    die "${collective}_perf failed (its output is above)"
  fi
done

# Parse each log's table: the header row naming the columns (it has "busbw" twice: out-of-place, then in-place)
# locates the columns, so versions that add a column still parse.
python3 - "$logs" "$min_busbw" "$check_from_bytes" "$json_out" "$where" <<'PY'
import json
import sys
from pathlib import Path

logs, min_busbw, check_from, json_out, where = Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]


def parse(text):
    columns, rows, average = None, [], None
    for line in text.splitlines():
        fields = line.split()
        if line.startswith("#") and "busbw" in fields and "size" in fields:
            columns = fields[1:]  # drop the leading "#"
        elif line.startswith("# Avg bus bandwidth"):
            average = float(line.split(":")[1].split()[0])
        elif columns and fields and fields[0].isdigit() and len(fields) >= len(columns) - 1:
            busbw = [i for i, name in enumerate(columns) if name == "busbw"]
            wrong = [fields[i] for i, name in enumerate(columns) if name == "#wrong" and i < len(fields)]
            try:
                rows.append({"bytes": int(fields[columns.index("size")]),
                             "busbw_gbps": float(fields[busbw[0]]),
                             "busbw_in_place_gbps": float(fields[busbw[1]]) if len(busbw) > 1 else None,
                             "time_us": float(fields[columns.index("time")]),
                             "wrong": sum(int(w) for w in wrong if w.isdigit())})
            except (ValueError, IndexError):
                continue  # a "N/A" or truncated line
    return rows, average


def human(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:g} {unit}"
        n /= 1024


report, failures = {"where": where, "min_busbw_gbps": min_busbw, "check_from_bytes": check_from, "collectives": {}}, []
for collective in ("broadcast", "all_reduce"):
    text = (logs / f"{collective}.log").read_text()
    rows, average = parse(text)
    if not rows:
        sys.stderr.write(text)
        sys.exit(f"nccl-tests: no result table in {collective}_perf's output (above)")
    checked = [r for r in rows if r["bytes"] >= check_from] or rows[-1:]
    peak = max(checked, key=lambda r: r["busbw_gbps"])
    report["collectives"][collective] = {"peak_busbw_gbps": peak["busbw_gbps"], "peak_at_bytes": peak["bytes"],
                                         "avg_busbw_gbps": average, "sizes": rows}
    print(f"{collective:<11} peak busbw {peak['busbw_gbps']:8.2f} GB/s at {human(peak['bytes']):>9}   "
          f"(nccl-tests average over all sizes {average if average is not None else float('nan'):.2f} GB/s)")
    for r in rows:
        if r["bytes"] >= check_from or r is rows[-1]:
            print(f"    {human(r['bytes']):>9}  busbw {r['busbw_gbps']:8.2f} GB/s  time {r['time_us']:12.1f} us")
    wrong = sum(r["wrong"] for r in rows)
    if wrong:  # -c 1 checks every result: a wrong one is corruption (bad GPU, NVLink or NIC), not slowness
        failures.append(f"{collective} returned {wrong} wrong element(s): data corruption on this path")
    if peak["busbw_gbps"] < min_busbw:
        failures.append(f"{collective} peak busbw {peak['busbw_gbps']:.2f} GB/s < required {min_busbw:g} GB/s")

report["ok"] = not failures
summary = json.dumps(report)
if json_out:
    Path(json_out).write_text(json.dumps(report, indent=2) + "\n")
print(summary)
if failures:
    sys.stderr.write("nccl-tests: FAILED: " + "; ".join(failures) + ". Weight sync will be slow or wrong on "
                     "this interconnect: check NCCL_DEBUG=INFO for the transport chosen (NVLink/IB vs sockets), "
                     "NCCL_SOCKET_IFNAME / NCCL_IB_HCA, and the GPU topology (nvidia-smi topo -m).\n")
    sys.exit(1)
PY
