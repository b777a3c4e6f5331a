#!/usr/bin/env bash
# NBD servers side by side, driven by the same clients: ringblk-nbd, qemu-nbd
# (--aio=io_uring --cache=writeback) and nbdkit (file plugin), each exporting
# the same warm-page-cache image (IMAGE_SIZE of random data as raw, and the
# same data converted to qcow2 by qemu-img) over a unix socket and over TCP on
# 127.0.0.1. Every measurement gets a freshly started server, the servers are
# interleaved within each run, and each figure is the median of RUNS runs.
#   randread, randwrite   fio's nbd engine, 4k at depth 32, 1 job, DURATION s:
#                         IOPS, and the server's CPU time per request (utime +
#                         stime of the server process from /proc/PID/stat)
#   copy-read-N           nbdcopy --connections=N --threads=N export -> null:
#   copy-write-N          nbdcopy --connections=N --threads=N local file -> export
#                         (N = 1 and 4; MB/s = 10^6 bytes/s. nbdcopy caps its
#                         connections at its thread count, which defaults to
#                         the number of cores, so --threads is passed too.)
# ringblk-nbd runs with RINGBLK_NBD_STATS=1 and is stopped with SIGTERM; the
# stats line it prints (user-copied-bytes=, served-bytes=) is reported for its
# raw read runs. nbdkit cannot serve qcow2 without the qcow2dec filter (nbdkit
# >= 1.36, read-only); without it nbdkit's qcow2 cells are n/a.
# Usage: scripts/bench/nbd.sh [workdir]   (needs fio with the nbd engine,
#   nbdcopy + nbdinfo (libnbd-bin), qemu-img, qemu-nbd, nbdkit, python3 or jq,
#   and a release build of ringblk-nbd: cargo build --release -p ringblk-nbd)
#   RUNS=1 DURATION=10 IMAGE_SIZE=1G PORT=10900 RINGBLK_NBD=target/release/ringblk-nbd
#   ONLY_SERVER=ringblk|qemu-nbd|nbdkit  ONLY_TRANSPORT=unix|tcp  ONLY_IMAGE=raw|qcow2
#   ONLY_TEST=randread|randwrite|copy-read-1|copy-read-4|copy-write-1|copy-write-4
#   (each ONLY_* takes a comma-separated list of names or globs: ONLY_TEST='copy-*')
#   WARM=read|write   how the image gets into the page cache before each run:
#     read (default) reads it (readahead: large folios); write evicts it and
#     rewrites it in place with 4 KiB writes (small folios). On ext4 with
#     large folios every server's 4k write into a large folio costs tens of
#     microseconds of kernel time (ext4_block_write_begin walks the folio's
#     buffer heads), so randwrite measures the kernel under read warming.
# A server whose binary is missing is skipped with a note (its cells are "-").
set -euo pipefail
ORIG=$PWD
cd "$(dirname "$0")/../.."
W=${1:-$(mktemp -d /var/tmp/ringblk-bench.XXXX)}
case $W in /*) ;; *) W=$ORIG/$W ;; esac
mkdir -p "$W"
RB=${RINGBLK_NBD:-target/release/ringblk-nbd}
if [ -n "${RINGBLK_NBD:-}" ]; then case $RB in /*) ;; */*) RB=$ORIG/$RB ;; esac; fi
case $RB in /*|*/*) ;; *) RB=$(command -v "$RB" || echo "$RB") ;; esac
case $RB in /*) ;; *) RB=$PWD/$RB ;; esac
RUNS=${RUNS:-1}
DURATION=${DURATION:-10}
IMAGE_SIZE=${IMAGE_SIZE:-1G}
PORT=${PORT:-10900}
WARM=${WARM:-read}
case $WARM in read|write) ;; *) echo "nbd.sh: WARM must be read or write" >&2; exit 1 ;; esac
SERVERS=(ringblk qemu-nbd nbdkit)
TRANSPORTS=(unix tcp)
IMAGES=(raw qcow2)
TESTS=(randread randwrite copy-read-1 copy-read-4 copy-write-1 copy-write-4)

note() { echo "# $*" >&2; }
die() { echo "nbd.sh: $*" >&2; exit 1; }
for t in fio nbdcopy nbdinfo qemu-img; do command -v $t >/dev/null || die "$t not found"; done
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd ioengine"
if command -v python3 >/dev/null; then JSON=python3
elif command -v jq >/dev/null; then JSON=jq
else die "need python3 or jq to read fio's JSON"; fi

# selected NAME VAR: is NAME in the comma-separated list of names/globs in $VAR (empty: all)?
selected() {
  local list=${!2:-} pat
  local -a pats
  [ -z "$list" ] && return 0
  IFS=, read -ra pats <<<"$list"
  for pat in "${pats[@]}"; do
    # shellcheck disable=SC2053
    [[ $1 == $pat ]] && return 0
  done
  return 1
}

# Servers that are selected and installed.
declare -A HAVE=()
for s in "${SERVERS[@]}"; do
  selected "$s" ONLY_SERVER || continue
  case $s in
    ringblk) bin=$RB ;;
    *) bin=$(command -v "$s" || true) ;;
  esac
  if [ -n "$bin" ] && [ -x "$bin" ]; then HAVE[$s]=1; else note "$s: ${bin:-$s} not found, skipped"; fi
done
[ ${#HAVE[@]} -gt 0 ] || die "no server to run"
QCOW2DEC=0
if [ -n "${HAVE[nbdkit]:-}" ]; then
  if nbdkit --filter=qcow2dec null --version >/dev/null 2>&1; then
    QCOW2DEC=1
    note "nbdkit serves qcow2 through --filter=qcow2dec (read-only: no write tests)"
  elif selected qcow2 ONLY_IMAGE; then
    note "nbdkit $(nbdkit --version | awk '{print $2}') has no qcow2dec filter: nbdkit skipped for qcow2"
  fi
fi

# Images: random data as raw, the same data as qcow2, and a separate file of
# random data as the source of the copy-write tests.
BYTES=$(numfmt --from=iec "$IMAGE_SIZE")
[ $((BYTES % 1048576)) -eq 0 ] || die "IMAGE_SIZE must be a whole number of MiB"
RAW=$W/nbd-$IMAGE_SIZE.raw
Q=$W/nbd-$IMAGE_SIZE.qcow2
SRC=$W/nbd-src-$IMAGE_SIZE.raw
for f in "$RAW" "$SRC"; do
  [ -f "$f" ] && [ "$(stat -c %s "$f")" -eq "$BYTES" ] ||
    dd if=/dev/urandom of="$f" bs=1M count=$((BYTES / 1048576)) status=none
done
[ -f "$Q" ] || qemu-img convert -f raw -O qcow2 "$RAW" "$Q"

SD=$(mktemp -d /tmp/ringblk-nbd-bench.XXXX)   # short path: unix socket names are limited to 108 bytes
SOCK=$SD/nbd.sock
PIDF=$SD/server.pid
LOGS=$W/nbd-logs
RES=$W/nbd-results
rm -rf "$RES"
mkdir -p "$LOGS" "$RES"
CLK=$(getconf CLK_TCK)

SRV_PID=
URI=
NSTART=0
stop_server() {
  [ -n "$SRV_PID" ] || return 0
  local i
  kill -TERM "$SRV_PID" 2>/dev/null || true
  for i in $(seq 100); do kill -0 "$SRV_PID" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$SRV_PID" 2>/dev/null; then
    note "server pid $SRV_PID ignored SIGTERM for 10 s: SIGKILL"
    kill -KILL "$SRV_PID" 2>/dev/null || true
  fi
  wait "$SRV_PID" 2>/dev/null || true
  SRV_PID=
  rm -f "$SOCK" "$PIDF"
}
# Clients run in the background and are waited for, so that a signal to the
# script is handled at once (bash runs traps only between foreground commands).
CL_PID=
client() {
  "$@" &
  CL_PID=$!
  local rc=0
  wait "$CL_PID" || rc=$?
  CL_PID=
  return $rc
}
cleanup() {
  if [ -n "$CL_PID" ]; then kill -TERM "$CL_PID" 2>/dev/null || true; wait "$CL_PID" 2>/dev/null || true; fi
  stop_server
  rm -rf "$SD"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# start_server SERVER TRANSPORT IMAGE LOG: sets SRV_PID (the server process
# itself, checked against its pid file) and URI; returns 1 if it did not come up.
start_server() {
  local s=$1 t=$2 img=$3 log=$4 file fmt i port pid
  local -a listen
  rm -f "$SOCK" "$PIDF"
  if [ "$img" = raw ]; then file=$RAW fmt=raw; else file=$Q fmt=qcow2; fi
  if [ "$t" = unix ]; then
    URI="nbd+unix:///?socket=$SOCK"
    if [ "$s" = nbdkit ]; then listen=(-U "$SOCK"); else listen=(-k "$SOCK"); fi
  else
    # A new port for every start: no waiting for the previous one to be free.
    for i in $(seq 100); do
      port=$((PORT + NSTART % 100)); NSTART=$((NSTART + 1))
      port_busy "$port" || break
    done
    URI="nbd://127.0.0.1:$port/"
    if [ "$s" = nbdkit ]; then listen=(-p "$port" -i 127.0.0.1); else listen=(-p "$port" -b 127.0.0.1); fi
  fi
  case $s in
    ringblk)
      RINGBLK_NBD_STATS=1 "$RB" "${listen[@]}" -f "$fmt" -t -e 8 --cache=writeback --aio=io_uring \
        --pid-file "$PIDF" "$file" >"$log" 2>&1 &
      ;;
    qemu-nbd)
      qemu-nbd "${listen[@]}" -f "$fmt" -t -e 8 --cache=writeback --aio=io_uring \
        --pid-file "$PIDF" "$file" >"$log" 2>&1 &
      ;;
    nbdkit)
      local -a filt=()
      [ "$fmt" = qcow2 ] && filt=(--filter=qcow2dec)
      nbdkit -f --exit-with-parent -P "$PIDF" "${listen[@]}" "${filt[@]}" file "$file" >"$log" 2>&1 &
      ;;
  esac
  SRV_PID=$!
  for i in $(seq 200); do
    if ! kill -0 "$SRV_PID" 2>/dev/null; then
      wait "$SRV_PID" 2>/dev/null || true
      SRV_PID=
      note "$s ($t, $img) exited at start; $log:"; sed 's/^/#   /' "$log" >&2
      return 1
    fi
    if [ -s "$PIDF" ] && nbdinfo --size "$URI" >/dev/null 2>&1; then
      pid=$(tr -dc 0-9 <"$PIDF")
      [ "$pid" = "$SRV_PID" ] || note "$s: pid file says $pid, started $SRV_PID; measuring $pid"
      SRV_PID=$pid
      return 0
    fi
    sleep 0.05
  done
  note "$s ($t, $img) not ready after 10 s; $log:"; sed 's/^/#   /' "$log" >&2
  stop_server
  return 1
}

# utime + stime of a process (all its threads, live and exited), in clock ticks.
cpu_ticks() {
  local s f
  s=$(cat "/proc/$1/stat" 2>/dev/null) || return 0   # gone: prints nothing
  read -ra f <<<"${s##*) }"   # after the comm field: f[0] is field 3, so utime (14) is f[11]
  echo $((f[11] + f[12]))
}

# fio_field FILE DIR: "iops total_ios" of fio's JSON (stdout may start with a
# "fio: connected to NBD server" line, so read from the first brace).
fio_field() {
  if [ "$JSON" = python3 ]; then
    python3 - "$1" "$2" <<'EOF'
import json, sys
s = open(sys.argv[1]).read()
j = json.loads(s[s.index('{'):])['jobs'][0][sys.argv[2]]
print(round(j['iops']), j['total_ios'])
EOF
  else
    sed -n '/^{/,$p' "$1" | jq -r ".jobs[0].$2 | \"\(.iops | round) \(.total_ios)\""
  fi
}

# warm FILE: bring FILE into the page cache as WARM says (after a sync).
warm() {
  if [ "$WARM" = read ]; then
    cat "$1" >/dev/null
  else
    python3 -c 'import os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)' "$1"
    dd if="$1" of="$1" ibs=1M obs=4k iflag=direct conv=notrunc status=none
  fi
}

median() { sort -n | awk '{a[NR]=$1} END {if (NR) print a[int((NR+1)/2)]}'; }

# measure TEST SERVER TRANSPORT IMAGE RUN: one fresh server, one measurement,
# appended to $RES/TEST.TRANSPORT.IMAGE.SERVER.{val,cpu}.
measure() {
  local test=$1 s=$2 t=$3 img=$4 run=$5 key=$1.$3.$4.$2 log c0 c1 out v n st e conns
  log=$LOGS/$s-$t-$img-$test-$run.log
  sync
  if [ "$img" = raw ]; then warm "$RAW"; else warm "$Q"; fi
  case $test in copy-write-*) cat "$SRC" >/dev/null ;; esac
  start_server "$s" "$t" "$img" "$log" || { echo fail >>"$RES/$key.err"; return 0; }
  case $test in
    randread|randwrite)
      out=$LOGS/fio-$s-$t-$img-$test-$run.json
      c0=$(cpu_ticks "$SRV_PID")
      if client timeout $((DURATION + 120)) fio --name=nbd --ioengine=nbd --uri="$URI" --rw="$test" --bs=4k \
          --iodepth=32 --numjobs=1 --time_based --runtime="$DURATION" --output-format=json \
          >"$out" 2>"$out.err"; then
        c1=$(cpu_ticks "$SRV_PID")
        v= n=
        if [ "$test" = randread ]; then read -r v n < <(fio_field "$out" read || true); else read -r v n < <(fio_field "$out" write || true); fi
        if [ -n "$v" ] && [ "${n:-0}" -gt 0 ]; then
          echo "$v" >>"$RES/$key.val"
          if [ -n "$c0" ] && [ -n "$c1" ]; then
            awk -v d=$((c1 - c0)) -v hz="$CLK" -v n="$n" 'BEGIN {printf "%.2f\n", d / hz * 1e6 / n}' >>"$RES/$key.cpu"
            note "$test $t $img $s run $run: $v IOPS, server CPU $(tail -1 "$RES/$key.cpu") us/request"
          else
            note "$test $t $img $s run $run: $v IOPS; server process gone, no CPU figure"
          fi
        else
          note "$test $t $img $s run $run: no IOPS in $out"
          echo fail >>"$RES/$key.err"
        fi
      else
        note "$test $t $img $s run $run: fio failed; $out.err:"; sed 's/^/#   /' "$out.err" >&2
        echo fail >>"$RES/$key.err"
      fi
      ;;
    copy-*)
      conns=${test##*-}
      if [ "$conns" -gt 1 ] && ! nbdinfo --can multi-conn "$URI" >/dev/null 2>&1; then
        note "$s does not advertise multi-conn: nbdcopy uses 1 connection"
      fi
      st=$(date +%s.%N)
      if [ "${test#copy-read}" != "$test" ]; then
        client timeout 600 nbdcopy --connections="$conns" --threads="$conns" "$URI" null: 2>"$log.nbdcopy" || e=$?
      else
        client timeout 600 nbdcopy --connections="$conns" --threads="$conns" "$SRC" "$URI" 2>"$log.nbdcopy" || e=$?
      fi
      if [ "${e:-0}" -eq 0 ]; then
        v=$(awk -v s="$st" -v e="$(date +%s.%N)" -v b="$BYTES" 'BEGIN {printf "%.0f\n", b / (e - s) / 1e6}')
        echo "$v" >>"$RES/$key.val"
        note "$test $t $img $s run $run: $v MB/s"
      else
        note "$test $t $img $s run $run: nbdcopy failed ($e); $log.nbdcopy:"; sed 's/^/#   /' "$log.nbdcopy" >&2
        echo fail >>"$RES/$key.err"
      fi
      ;;
  esac
  stop_server
  if [ "$s" = ringblk ]; then
    st=$(grep -o 'requests=.*' "$log" | tail -1 || true)
    if [ -n "$st" ]; then echo "$t $img $test $run $st" >>"$RES/ringblk-stats"
    else note "ringblk-nbd printed no stats line on exit ($log)"; fi
  fi
}

note "workdir $W, image $IMAGE_SIZE, fio ${DURATION}s, RUNS=$RUNS, servers: ${!HAVE[*]}"
for t in "${TRANSPORTS[@]}"; do
  selected "$t" ONLY_TRANSPORT || continue
  for img in "${IMAGES[@]}"; do
    selected "$img" ONLY_IMAGE || continue
    for test in "${TESTS[@]}"; do
      selected "$test" ONLY_TEST || continue
      for run in $(seq "$RUNS"); do
        for s in "${SERVERS[@]}"; do
          [ -n "${HAVE[$s]:-}" ] || continue
          if [ "$s" = nbdkit ] && [ "$img" = qcow2 ]; then
            [ $QCOW2DEC = 1 ] || continue
            case $test in randwrite|copy-write-*) continue ;; esac
          fi
          measure "$test" "$s" "$t" "$img" "$run"
        done
      done
      echo "$test.$t.$img" >>"$RES/rows"
    done
  done
done
[ -f "$RES/rows" ] || die "nothing selected"

# cell KEY SUFFIX: median of the runs, "fail" if every run failed, "-" if not run.
cell() {
  if [ -s "$RES/$1.$2" ]; then median <"$RES/$1.$2"
  elif [ -s "$RES/$1.err" ]; then echo fail
  else echo -; fi
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (a + 0 > 0 && b + 0 > 0) printf "%.2f\n", a / b; else print "-"}'; }
label() { # TEST TABLE
  local u=" (IOPS)"; [ "$2" = cpu ] && u=
  case $1 in
    randread) echo "4k randread QD32$u" ;;
    randwrite) echo "4k randwrite QD32$u" ;;
    copy-read-*) echo "nbdcopy -C ${1##*-} export -> null: (MB/s)" ;;
    copy-write-*) echo "nbdcopy -C ${1##*-} file -> export (MB/s)" ;;
  esac
}
table() { # SUFFIX (val|cpu)
  local row test t img a b c
  while IFS=. read -r test t img; do
    [ "$1" = cpu ] && case $test in copy-*) continue ;; esac
    a=$(cell "$test.$t.$img.ringblk" "$1"); b=$(cell "$test.$t.$img.qemu-nbd" "$1"); c=$(cell "$test.$t.$img.nbdkit" "$1")
    if [ -n "${HAVE[nbdkit]:-}" ] && [ "$img" = qcow2 ]; then
      case $QCOW2DEC.$test in 0.*|1.randwrite|1.copy-write-*) c=n/a ;; esac
    fi
    echo "| $(label "$test" "$1") | $t | $img | $a | $b | $c | $(ratio "$a" "$b") | $(ratio "$a" "$c") |"
  done <"$RES/rows"
}

echo
echo "### NBD servers: $IMAGE_SIZE image in the page cache (WARM=$WARM), fio ${DURATION}s per run, median of $RUNS run(s)"
echo
echo "| test | transport | image | ringblk | qemu-nbd | nbdkit | ringblk/qemu-nbd | ringblk/nbdkit |"
echo "|---|---|---|---|---|---|---|---|"
table val
if grep -qv '^copy-' "$RES/rows"; then
  echo
  echo "Server CPU per request, µs (utime + stime of the server process over the fio run / requests; lower is better):"
  echo
  echo "| test | transport | image | ringblk | qemu-nbd | nbdkit | ringblk/qemu-nbd | ringblk/nbdkit |"
  echo "|---|---|---|---|---|---|---|---|"
  table cpu
fi
if [ -s "$RES/ringblk-stats" ] && grep -qE '^[a-z]+ raw (randread|copy-read)' "$RES/ringblk-stats"; then
  echo
  echo "ringblk-nbd on raw, bytes copied in user space per byte served (RINGBLK_NBD_STATS=1 line at exit):"
  echo
  echo "| test | transport | run | requests | served-bytes | user-copied-bytes | copied/served |"
  echo "|---|---|---|---|---|---|---|"
  grep -E '^[a-z]+ raw (randread|copy-read)' "$RES/ringblk-stats" | while read -r t img test run rest; do
    req=$(grep -o 'requests=[0-9]*' <<<"$rest" | cut -d= -f2)
    sv=$(grep -o 'served-bytes=[0-9]*' <<<"$rest" | cut -d= -f2)
    uc=$(grep -o 'user-copied-bytes=[0-9]*' <<<"$rest" | cut -d= -f2)
    echo "| $test | $t | $run | $req | $sv | $uc | $(awk -v a="$uc" -v b="$sv" 'BEGIN {if (b > 0) printf "%.3f", a / b; else print "-"}') |"
  done
fi
echo
echo "(logs: $LOGS)"
