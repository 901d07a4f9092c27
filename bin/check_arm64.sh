#!/usr/bin/env bash
# Check optim's bits on aarch64 against this x86-64 machine: a Debian 12 (bookworm) arm64
# userland under qemu-user builds optim from this working tree and runs bin/check_bits.py
# and the CPU kernel tests; docs/cpu.md ("aarch64, checked under qemu") says what it showed.
#
#   bin/check_arm64.sh [--root DIR] [--keep] [--python PY] [--steps N] [--split N]
#                      [--tests "tests/test_a.py tests/test_b.py ..."]
#
# As root on an x86-64 Debian/Ubuntu machine with optim built in place here
# (`python setup.py build_ext --inplace`), PY being a Python with NumPy (default: .venv's,
# else python3). Checks, each PASS or FAIL, and the time of every phase:
#   (a) check_bits.py at 1 and 2 threads on x86-64 and on aarch64: all four hash sets equal;
#   (b) state saved after --split steps on one machine, resumed on the other for the rest
#       (--steps in all): the same hashes as the uninterrupted run, both ways;
#   (c) the CPU kernel tests in the chroot (--tests; those needing Thinc, spaCy, torch or
#       CuPy skip: none of them is installed there).
# --root DIR (default /var/tmp/optim-arm64) holds the userland; --keep keeps it, and a later
# run skips debootstrap, apt and pip, and the build when optim/ and the setup files are
# unchanged. Without --keep it is deleted at exit, after /proc, /sys and /dev are
# unmounted from it.
# Exit status: 0 when every check passes, 1 when one fails, 2 when setup fails.
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
ROOT=/var/tmp/optim-arm64
KEEP=0
PYTHON=""
STEPS=1200
SPLIT=700
TESTS="tests/kernels/test_reference.py tests/kernels/test_cpu.py tests/kernels/test_step_many_batch.py
tests/optimizer/test_state.py tests/optimizer/test_nonfinite.py tests/optimizer/test_schedules.py
tests/optimizer/test_optimizer_api.py tests/integration_thinc/test_checkpoint.py tests/kernels/test_check_bits.py"
PIP_PACKAGES="numpy Cython cymem catalogue srsly confection tqdm pytest hypothesis setuptools wheel"

usage() { sed -n '2,21s/^# \{0,1\}//p' "$0"; exit "${1:-2}"; }
while [ $# -gt 0 ]; do
    case "$1" in
        --root) ROOT=$2; shift 2 ;;
        --keep) KEEP=1; shift ;;
        --python) PYTHON=$2; shift 2 ;;
        --steps) STEPS=$2; shift 2 ;;
        --split) SPLIT=$2; shift 2 ;;
        --tests) TESTS=$2; shift 2 ;;
        -h|--help) usage 0 ;;
        *) echo "unknown argument: $1" >&2; usage ;;
    esac
done

die() { echo "check_arm64: $*" >&2; exit 2; }
[ "$(uname -m)" = x86_64 ] || die "runs on x86-64 (this is $(uname -m))"
[ "$(id -u)" = 0 ] || die "needs root (apt-get, debootstrap, mount, chroot)"
case "$ROOT" in /?*/?*) ;; *) die "--root must be an absolute path two levels deep or more" ;; esac
ROOT=${ROOT%/}
[ "$SPLIT" -gt 0 ] && [ "$SPLIT" -lt "$STEPS" ] || die "--split must lie in 1 .. --steps - 1"
[ -n "$PYTHON" ] || { [ -x "$REPO/.venv/bin/python" ] && PYTHON=$REPO/.venv/bin/python || PYTHON=python3; }
MARK=$ROOT/.optim-arm64          # our marker: only a root holding it is ever deleted
WORK=/tmp/optim-bits             # inside the chroot; $ROOT$WORK from here
SRC=/opt/optim                   # the tree's copy inside the chroot
LOGS=$ROOT/opt/logs

# ---------------------------------------------------------------- phases and results
PHASES=(); RESULTS=(); FAILED=0
now() { echo "$EPOCHREALTIME"; }
phase() { PHASE_NAME=$1; PHASE_T0=$(now); echo "== $1" >&2; }
phase_done() {  # phase_done [note]
    local secs; secs=$(awk -v a="$PHASE_T0" -v b="$(now)" 'BEGIN{printf "%.0f", b-a}')
    PHASES+=("$(printf '%-40s %5s s  %s' "$PHASE_NAME" "$secs" "${1:-}")")
}
result() {  # result PASS|FAIL text
    RESULTS+=("$1  $2"); [ "$1" = PASS ] || FAILED=1
}

# ---------------------------------------------------------------- mounts and cleanup
mounted_under_root() { awk -v r="$ROOT/" 'index($2, r) == 1' /proc/mounts; }
unmount_all() {
    local d
    for d in dev sys proc; do
        if mountpoint -q "$ROOT/$d" 2>/dev/null; then
            umount "$ROOT/$d" 2>/dev/null || umount -l "$ROOT/$d"
        fi
    done
}
mount_all() {
    local d
    for d in proc sys dev; do
        mkdir -p "$ROOT/$d"
        mountpoint -q "$ROOT/$d" || mount --bind "/$d" "$ROOT/$d" || die "cannot bind /$d"
    done
}
wipe_root() {  # delete the userland: only ours, only with nothing mounted inside
    unmount_all
    [ -e "$MARK" ] || die "$ROOT is not ours (no $MARK): not deleting it"
    [ -z "$(mounted_under_root)" ] || die "still mounted under $ROOT: not deleting it"
    rm -rf --one-file-system "$ROOT"
}
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    unmount_all
    if [ "$KEEP" = 0 ] && [ -e "$MARK" ]; then
        ( wipe_root ) && echo "removed $ROOT (--keep keeps it)" >&2
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

in_chroot() {  # in_chroot CMD...: a clean environment, the venv first on PATH
    chroot "$ROOT" /usr/bin/env -i HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive \
        PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"
}
logged() {  # logged NAME CMD...: output to $LOGS/NAME.log, its tail on failure
    local name=$1 status; shift
    "$@" >"$LOGS/$name.log" 2>&1 </dev/null
    status=$?
    [ $status = 0 ] || { tail -n 30 "$LOGS/$name.log" >&2; die "$name failed (log: $LOGS/$name.log)"; }
}

host_mirror() {  # the bookworm mirror this machine's apt uses
    local f uri=""
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -e "$f" ] || continue
        uri=$(awk 'BEGIN{RS=""} /(^|\n)Suites:[^\n]*[ \t]bookworm([ \t\n]|$)/ {
                 if (match($0, /URIs:[ \t]*[^ \t\n]+/)) { s = substr($0, RSTART, RLENGTH);
                 sub(/URIs:[ \t]*/, "", s); print s; exit } }' "$f")
        [ -n "$uri" ] && break
    done
    if [ -z "$uri" ]; then
        uri=$(cat /etc/apt/sources.list.d/*.list /etc/apt/sources.list 2>/dev/null |
              awk '$1 == "deb" { sub(/^\[[^]]*\] */, "", $2) } $1 == "deb" && $3 == "bookworm" { print $2; exit }')
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}

tree_files() {  # the working tree: tracked and untracked files git does not ignore
    if git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then
        git -C "$REPO" ls-files -z -co --exclude-standard |
            (cd "$REPO" && while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done)
    else
        (cd "$REPO" && find . -type f ! -path './.git/*' ! -path './.venv*' ! -path './build/*' \
            ! -name '*.so' ! -name '*.pyc' -printf '%P\0')
    fi | LC_ALL=C sort -z
}

# ---------------------------------------------------------------- setup
T_START=$(now)
phase "host packages, binfmt"
if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null ||
   ! command -v update-binfmts >/dev/null; then
    apt-get update -qq >/dev/null &&
        apt-get install -y -qq qemu-user-static debootstrap binfmt-support >/dev/null ||
        die "apt-get install qemu-user-static debootstrap binfmt-support failed"
fi
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc || die "cannot mount binfmt_misc"
fi
update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
grep -qx enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null ||
    die "qemu-aarch64 is not registered with binfmt_misc (update-binfmts --enable qemu-aarch64)"
NATIVE_OK=$(PYTHONPATH=$REPO "$PYTHON" -c "
import os, optim, optim._kernels
print(os.path.dirname(os.path.dirname(os.path.abspath(optim.__file__))))" 2>&1 | tail -1)
[ "$NATIVE_OK" = "$REPO" ] ||
    die "PYTHONPATH=$REPO $PYTHON does not import optim from $REPO built in place: $NATIVE_OK"
OLDEST_SO=$(ls -t "$REPO"/optim/*.so | tail -1)
NEWER=$(find "$REPO/optim" -maxdepth 1 \( -name '*.pyx' -o -name '*.pxd' -o -name '*.pxi' \
        -o -name '*.h' \) -newer "$OLDEST_SO" -printf '%f ')
[ -z "$NEWER" ] || die "sources newer than the in-place build ($NEWER): rebuild with
  $PYTHON setup.py build_ext --inplace"
phase_done

if [ -e "$ROOT" ] && [ ! -e "$MARK" ] && [ -n "$(ls -A "$ROOT")" ]; then
    die "$ROOT exists and is not an optim arm64 userland (no $MARK); pick another --root"
fi
mkdir -p "$ROOT" && touch "$MARK" || die "cannot create $ROOT"

phase "debootstrap (arm64 bookworm)"
if [ -e "$MARK.debootstrap" ]; then
    phase_done "kept from an earlier run"
else
    MIRROR=$(host_mirror)
    unmount_all
    [ -z "$(mounted_under_root)" ] || die "still mounted under $ROOT"
    find "$ROOT" -mindepth 1 -maxdepth 1 ! -name .optim-arm64 -exec rm -rf --one-file-system {} +
    debootstrap --arch=arm64 --variant=minbase bookworm "$ROOT" "$MIRROR" \
        >"$ROOT.debootstrap.log" 2>&1 || { tail -n 30 "$ROOT.debootstrap.log" >&2
                                          die "debootstrap failed ($ROOT.debootstrap.log)"; }
    rm -f "$ROOT.debootstrap.log"
    touch "$MARK.debootstrap"
    phase_done "mirror $MIRROR"
fi
mkdir -p "$LOGS"
mount_all
cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
[ "$(in_chroot uname -m)" = aarch64 ] || die "the chroot does not run as aarch64"

phase "apt in the chroot"
if [ -e "$MARK.packages" ]; then
    phase_done "kept"
else
    grep -hsE '^\s*Acquire::(Check-Valid-Until|Check-Date|https?::Proxy)' /etc/apt/apt.conf.d/* \
        >"$ROOT/etc/apt/apt.conf.d/99optim-host" || true
    logged apt-update in_chroot apt-get update
    logged apt-install in_chroot apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev gcc g++ ca-certificates
    touch "$MARK.packages"
    phase_done
fi

phase "venv and pip in the chroot"
if [ -e "$MARK.venv" ]; then
    phase_done "kept"
else
    mkdir -p "$ROOT/usr/local/share/ca-certificates"
    cp /usr/local/share/ca-certificates/* "$ROOT/usr/local/share/ca-certificates/" 2>/dev/null || true
    logged ca in_chroot update-ca-certificates
    [ -e /etc/pip.conf ] && cp /etc/pip.conf "$ROOT/etc/pip.conf"
    [ -d /etc/xdg/pip ] && mkdir -p "$ROOT/etc/xdg" && cp -r /etc/xdg/pip "$ROOT/etc/xdg/"
    rm -rf "$ROOT/opt/venv"
    logged venv in_chroot python3 -m venv /opt/venv
    # shellcheck disable=SC2086
    logged pip in_chroot pip install --no-cache-dir $PIP_PACKAGES
    touch "$MARK.venv"
    phase_done
fi

phase "build optim in the chroot"
# The whole tree is copied every run; optim is rebuilt only when what the build reads changed.
BUILD_SHA=$( (cd "$REPO" && tree_files |
              grep -zE '^(optim/|setup\.py$|setup\.cfg$|pyproject\.toml$)' | xargs -0 sha256sum) |
            sha256sum | cut -c1-16)
copy_tree() { (cd "$REPO" && tree_files | tar --null -T - -cf -) | tar -C "$ROOT$SRC" -xf - ||
                  die "cannot copy the tree"; }
if [ -e "$ROOT$SRC/.optim-build" ] && [ "$(cat "$ROOT$SRC/.optim-build")" = "$BUILD_SHA" ]; then
    copy_tree
    phase_done "build inputs $BUILD_SHA unchanged: not rebuilt"
else
    rm -rf "$ROOT$SRC" && mkdir -p "$ROOT$SRC"
    copy_tree
    logged build in_chroot sh -c "cd $SRC && python setup.py build_ext --inplace -j 2"
    echo "$BUILD_SHA" >"$ROOT$SRC/.optim-build"
    phase_done "build inputs $BUILD_SHA"
fi
ARM_CONFIG=$(in_chroot sh -c "cd $SRC && PYTHONPATH=$SRC python -c '
import platform, numpy, optim, optim.cpu
c = optim.cpu.config()
print(platform.python_version(), numpy.__version__, c[\"isa\"], c[\"threads\"], c[\"thread_pool\"])'")
GCC_ARM=$(in_chroot gcc -dumpfullversion)
HOST_CONFIG=$(PYTHONPATH=$REPO "$PYTHON" -c '
import platform, numpy, optim, optim.cpu
c = optim.cpu.config()
print(platform.python_version(), numpy.__version__, c["isa"], c["threads"], c["thread_pool"])')

# ---------------------------------------------------------------- the checks
rm -rf "$ROOT$WORK" && mkdir -p "$ROOT$WORK"
bits_x86() { PYTHONPATH=$REPO "$PYTHON" "$REPO/bin/check_bits.py" --json "$@"; }
bits_arm() { in_chroot sh -c 'cd "$0" && PYTHONPATH="$0" exec python bin/check_bits.py --json "$@"' \
                 "$SRC" "$@"; }
run_bits() {  # run_bits x86|arm OUT.json ARGS...: OUT in $WORK
    local side=$1 out=$2; shift 2
    if "bits_$side" "$@" >"$ROOT$WORK/$out" 2>"$ROOT$WORK/$out.err"; then return 0; fi
    cat "$ROOT$WORK/$out.err" >&2; return 1
}

phase "(a) hashes on x86-64, 1 and 2 threads"
run_bits x86 x86.t1.json --steps "$STEPS" --threads 1 && run_bits x86 x86.t2.json --steps "$STEPS" --threads 2
A_X86=$?
phase_done
phase "(a) hashes on aarch64, 1 and 2 threads"
run_bits arm arm.t1.json --steps "$STEPS" --threads 1 && run_bits arm arm.t2.json --steps "$STEPS" --threads 2
A_ARM=$?
phase_done

compare() {  # compare NAME REFERENCE.json OTHER.json...: PASS when every file equals the first
    python3 - "$ROOT$WORK" "$@" <<'EOF'
import json, sys
work, name, files = sys.argv[1], sys.argv[2], sys.argv[3:]
runs = {f: json.load(open(f"{work}/{f}")) for f in files}
first = runs[files[0]]
bad = sorted({c for r in runs.values() for c in set(r) | set(first) if r.get(c) != first.get(c)})
print(f"{'PASS' if not bad else 'FAIL'}\t{name}: {len(first) - len(bad)}/{len(first)} hashes "
      f"equal across {', '.join(f[:-5] for f in files)}")
for case in bad:
    for f in files:
        print(f"      {case:28s} {f[:-5]:16s} {runs[f].get(case, 'missing')}")
EOF
}
report() {  # report OUTPUT_OF_COMPARE
    local first rest
    first=$(printf '%s\n' "$1" | head -1); rest=$(printf '%s\n' "$1" | tail -n +2)
    result "${first%%$'\t'*}" "${first#*$'\t'}${rest:+$'\n'$rest}"
}
if [ $A_X86 = 0 ] && [ $A_ARM = 0 ]; then
    report "$(compare "(a) same bits" x86.t1.json x86.t2.json arm.t1.json arm.t2.json)"
else
    result FAIL "(a) check_bits.py failed on $([ $A_X86 = 0 ] || echo x86-64) $([ $A_ARM = 0 ] || echo aarch64)"
fi

REST=$((STEPS - SPLIT))
phase "(b) save on x86-64, resume on aarch64"
rm -rf "$ROOT$WORK/state-x86"
if run_bits x86 save-x86.json --steps "$SPLIT" --threads 1 --save-state "$ROOT$WORK/state-x86" &&
   run_bits arm resume-arm.json --steps "$REST" --threads 2 --resume "$WORK/state-x86"; then
    report "$(compare "(b) x86-64 $SPLIT steps (1 thread) -> aarch64 $REST (2 threads) vs straight" \
              x86.t1.json resume-arm.json)"
else
    result FAIL "(b) save on x86-64 / resume on aarch64 did not run"
fi
phase_done
phase "(b) save on aarch64, resume on x86-64"
rm -rf "$ROOT$WORK/state-arm"
if run_bits arm save-arm.json --steps "$SPLIT" --threads 1 --save-state "$WORK/state-arm" &&
   run_bits x86 resume-x86.json --steps "$REST" --threads 2 --resume "$ROOT$WORK/state-arm"; then
    report "$(compare "(b) aarch64 $SPLIT steps (1 thread) -> x86-64 $REST (2 threads) vs straight" \
              x86.t1.json resume-x86.json)"
else
    result FAIL "(b) save on aarch64 / resume on x86-64 did not run"
fi
phase_done

phase "(c) CPU kernel tests in the chroot"
mkdir -p "$ROOT/opt/pytest-plugins"
cat >"$ROOT/opt/pytest-plugins/qemu_hypothesis.py" <<'EOF'
"""Emulated code runs ~7x slower: no per-example deadline, no too_slow health check."""
from hypothesis import HealthCheck, settings

settings.register_profile("qemu", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("qemu")
EOF
# shellcheck disable=SC2086
in_chroot sh -c 'cd "$0" && PYTHONPATH="$0:/opt/pytest-plugins" exec python -m pytest -q -rs \
    -p no:cacheprovider -p qemu_hypothesis "$@"' "$SRC" $TESTS >"$LOGS/tests.log" 2>&1
C_STATUS=$?
C_LINE=$(grep -E '^[0-9]+ (passed|failed)|(passed|failed|error|skipped).* in [0-9.]+s' "$LOGS/tests.log" | tail -1)
C_SKIPS=$(grep -E '^SKIPPED' "$LOGS/tests.log" | sed 's/^SKIPPED /      /')
if [ $C_STATUS = 0 ]; then
    result PASS "(c) tests in the chroot: ${C_LINE:-?}${C_SKIPS:+$'\n'$C_SKIPS}"
else
    result FAIL "(c) tests in the chroot (exit $C_STATUS): ${C_LINE:-?} (log: $LOGS/tests.log)"
    grep -E '^(FAILED|ERROR)' "$LOGS/tests.log" | head -20 >&2
fi
phase_done

# ---------------------------------------------------------------- summary
TOTAL=$(awk -v a="$T_START" -v b="$(now)" 'BEGIN{printf "%.0f", b-a}')
{
    echo
    echo "optim on aarch64 (qemu-user, Debian 12 arm64 chroot at $ROOT) against x86-64"
    echo "  x86-64 : Python, NumPy, SIMD level, threads, pool = $HOST_CONFIG"
    echo "  aarch64: Python, NumPy, SIMD level, threads, pool = $ARM_CONFIG; gcc $GCC_ARM"
    echo "  build inputs $BUILD_SHA; check_bits.py --steps $STEPS (resumed after $SPLIT)"
    echo
    echo "phases:"
    printf '  %s\n' "${PHASES[@]}"
    printf '  %-40s %5s s\n' total "$TOTAL"
    echo
    if [ -s "$ROOT$WORK/x86.t1.json" ]; then
        echo "hashes (x86-64, 1 thread; the checks above compare every other run with these):"
        python3 -c 'import json,sys; [print(f"  {k:28s} {v}") for k, v in json.load(open(sys.argv[1])).items()]' \
            "$ROOT$WORK/x86.t1.json"
        echo
    fi
    echo "checks:"
    printf '  %s\n' "${RESULTS[@]}"
    echo
    if [ $FAILED = 0 ]; then echo "PASS: the same bits on aarch64 as on x86-64"; else echo "FAIL"; fi
}
exit $FAILED
