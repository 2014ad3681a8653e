#!/usr/bin/env bash
# ktls-vm.sh: run one program inside a throw-away qemu VM whose Debian kernel has kTLS.
#
# The host kernel may lack CONFIG_TLS (TCP_ULP "tls" -> ENOENT), so kTLS code paths run
# in a small VM: a Debian cloud kernel, a busybox initramfs with the tls/crypto modules,
# the program and its shared libraries. The console is the only channel out; the guest
# prints KTERN-VM-EXIT=<status> and this script exits with that status.
# See scripts/README.md ("Why a VM, and what it needs").
set -euo pipefail

usage() {
	cat <<'EOF'
Usage:
  scripts/ktls-vm.sh --kernel 6.1|6.18 [options] -- PROGRAM [ARGS...]
  scripts/ktls-vm.sh --kernel 6.1|6.18 [options] --probe [-- PROBE-ARGS...]

Options:
  --kernel 6.1|6.18   6.1: Debian 12 bookworm cloud kernel; 6.18: trixie-backports cloud kernel
  --mem MiB           guest memory (default 1024)
  --timeout SECS      wall-clock limit for the VM run (default 900)
  --file SRC:DST      copy host file/dir SRC to absolute path DST in the guest (repeatable;
                      dynamic executables also get their ldd libraries)
  --env NAME=VALUE    export NAME=VALUE in the guest before PROGRAM runs (repeatable)
  --probe             run scripts/ktls-probe.c (compiled on demand) instead of PROGRAM
  --prepare-only      fetch/prepare the kernel cache and exit 0
  -h, --help          this text

Exit status: PROGRAM's exit status as reported by the guest; 125 if the guest printed no
status (timeout, kernel panic, boot failure); 2 for usage errors.
Environment: KTERN_VM_CACHE (cache dir, default <repo>/target/ktls-vm),
  KTERN_VM_QEMU_ARGS (extra qemu arguments, split on spaces, e.g. "-icount shift=0"),
  KTERN_VM_APPEND (extra kernel command line, e.g. "cryptomgr.notests=1").
EOF
}

die() {
	echo "ktls-vm: error: $*" >&2
	exit 125
}
note() { echo "ktls-vm: $*" >&2; }

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd)
export PATH="$PATH:/usr/sbin:/sbin"

KERNEL=""
MEM=1024
TIMEOUT=900
PROBE=0
PREPARE_ONLY=0
FILES=()
ENVS=()
PROGRAM=""
PROG_ARGS=()

usage_error() {
	echo "ktls-vm: $*" >&2
	echo "Try 'scripts/ktls-vm.sh --help'." >&2
	exit 2
}

while (($#)); do
	case "$1" in
	--kernel)
		(($# >= 2)) || usage_error "--kernel needs a value"
		KERNEL=$2
		shift 2
		;;
	--kernel=*) KERNEL=${1#*=}; shift ;;
	--mem)
		(($# >= 2)) || usage_error "--mem needs a value"
		MEM=$2
		shift 2
		;;
	--mem=*) MEM=${1#*=}; shift ;;
	--timeout)
		(($# >= 2)) || usage_error "--timeout needs a value"
		TIMEOUT=$2
		shift 2
		;;
	--timeout=*) TIMEOUT=${1#*=}; shift ;;
	--file)
		(($# >= 2)) || usage_error "--file needs SRC:DST"
		FILES+=("$2")
		shift 2
		;;
	--file=*) FILES+=("${1#*=}"); shift ;;
	--env)
		(($# >= 2)) || usage_error "--env needs NAME=VALUE"
		ENVS+=("$2")
		shift 2
		;;
	--env=*) ENVS+=("${1#*=}"); shift ;;
	--probe) PROBE=1; shift ;;
	--prepare-only) PREPARE_ONLY=1; shift ;;
	-h | --help) usage; exit 0 ;;
	--)
		shift
		break
		;;
	*) usage_error "unknown option '$1' (the program goes after --)" ;;
	esac
done

case "$KERNEL" in
6.1 | 6.18) ;;
"") usage_error "--kernel 6.1|6.18 is required" ;;
*) usage_error "--kernel must be 6.1 or 6.18, not '$KERNEL'" ;;
esac
[[ $MEM =~ ^[1-9][0-9]*$ ]] || usage_error "--mem must be a positive integer (MiB)"
[[ $TIMEOUT =~ ^[1-9][0-9]*$ ]] || usage_error "--timeout must be a positive integer (seconds)"
for spec in "${FILES[@]}"; do
	[[ $spec == *:/* ]] || usage_error "--file wants SRC:DST with an absolute DST, got '$spec'"
done
for spec in "${ENVS[@]}"; do
	[[ $spec =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || usage_error "--env wants NAME=VALUE, got '$spec'"
done
if ((PROBE)); then
	PROG_ARGS=("$@")
elif ((!PREPARE_ONLY)); then
	(($#)) || usage_error "no PROGRAM given (put it after --)"
	PROGRAM=$1
	shift
	PROG_ARGS=("$@")
fi

CACHE_ROOT=${KTERN_VM_CACHE:-$REPO_DIR/target/ktls-vm}
mkdir -p "$CACHE_ROOT"
CACHE_ROOT=$(cd "$CACHE_ROOT" && pwd)

# ---------------------------------------------------------------------------
# Cleanup: temp files and dirs are removed and a running VM is stopped on any exit.
CLEANUP_PATHS=()
VM_PID=""
# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
	if [[ -n $VM_PID ]]; then
		kill "$VM_PID" 2>/dev/null || true
	fi
	local d
	for d in "${CLEANUP_PATHS[@]}"; do
		if [[ -n $d ]]; then rm -rf -- "$d"; fi
	done
}
trap cleanup EXIT
trap 'note "interrupted"; exit 130' INT
trap 'note "terminated"; exit 143' TERM
trap 'exit 129' HUP

# Run a command with its output kept in a log; show the log only if it fails.
quietly() {
	local log
	log=$(mktemp "$CACHE_ROOT/.cmd-log.XXXXXX")
	CLEANUP_PATHS+=("$log")
	local rc=0
	"$@" >"$log" 2>&1 || rc=$?
	if ((rc == 0)); then
		rm -f -- "$log"
		return 0
	fi
	echo "ktls-vm: command failed (status $rc): $*" >&2
	tail -n 30 "$log" >&2
	rm -f -- "$log"
	return "$rc"
}

# ---------------------------------------------------------------------------
# 1. Host packages.
SUDO=()
if ((EUID != 0)); then
	if command -v sudo >/dev/null 2>&1; then
		SUDO=(sudo -n)
	fi
fi

pkg_installed() {
	[[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true) == "install ok installed" ]]
}

ensure_packages() {
	local missing=() p
	for p in "$@"; do
		pkg_installed "$p" || missing+=("$p")
	done
	((${#missing[@]})) || return 0
	if ((EUID != 0)) && ((${#SUDO[@]} == 0)); then
		die "missing Debian packages: ${missing[*]} (run: apt-get install --no-install-recommends ${missing[*]})"
	fi
	note "installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	# A fresh machine may have no package lists yet: update once and retry.
	if ! quietly "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"; then
		note "retrying after apt-get update"
		quietly "${SUDO[@]}" apt-get update -q
		quietly "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
	fi
}

# debian-archive-keyring: the kernels' sources are signed by Debian's keys,
# which Ubuntu does not ship by default.
ensure_packages qemu-system-x86 busybox-static cpio kmod xz-utils debian-archive-keyring
if ((PROBE)); then
	ensure_packages gcc libc6-dev
fi

# ---------------------------------------------------------------------------
# 2. Kernel cache: <cache>/<kernel>/{vmlinuz,release,package,lib/modules/<release>/...}
#    Built in a temp dir next to it and renamed into place, so a half-done run leaves nothing.
KDIR=$CACHE_ROOT/$KERNEL

# Modules loaded in the guest; their dependency closure is kept in the cache.
GUEST_MODULES=(tls gcm aesni_intel chacha20poly1305 ccm)
# Module dirs kept whole (plus the closure above).
KEEP_MODULE_DIRS=(kernel/crypto kernel/arch/x86/crypto kernel/net/tls kernel/lib)

APT_OPTS=()
# Point apt at a private sources file, lists and cache (the system apt config is untouched).
private_apt() {
	local dir=$1 sources=$2
	mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial"
	printf '%s\n' "$sources" >"$dir/sources.list"
	APT_OPTS=(
		-o "Dir::Etc::sourcelist=$dir/sources.list"
		-o "Dir::Etc::sourceparts=-"
		-o "Dir::State::Lists=$dir/lists"
		-o "Dir::Cache=$dir/cache"
		-o "Dir::Etc::Preferences=/dev/null"
		-o "Dir::Etc::PreferencesParts=-"
	)
}

# Newest package whose name matches the extended regex $1 (anchored by the caller).
newest_package() {
	apt-cache "${APT_OPTS[@]}" search --names-only "$1" 2>/dev/null |
		awk '{print $1}' | sort -V | tail -n 1
}

# Pick the newest package matching $1 (then $2 if none) and download it into the cwd.
# $3 = "update-ok": run apt-get update when the package is unknown or the download fails.
fetch_kernel_package() {
	local regex=$1 fallback=$2 can_update=$3 pkg="" attempt
	for attempt in 1 2; do
		pkg=$(newest_package "$regex")
		[[ -n $pkg ]] || pkg=$(newest_package "$fallback")
		if [[ -n $pkg ]] &&
			quietly apt-get "${APT_OPTS[@]}" -o APT::Sandbox::User=root download "$pkg"; then
			return 0
		fi
		if [[ $attempt == 1 && $can_update == update-ok ]]; then
			note "${pkg:-no package matching $regex}: not available, running apt-get update"
			quietly "${SUDO[@]}" apt-get "${APT_OPTS[@]}" update -q ||
				die "apt-get update failed"
		else
			break
		fi
	done
	die "could not download a kernel package matching '$regex'"
}

prepare_kernel() {
	local tmp
	tmp=$(mktemp -d "$CACHE_ROOT/.prepare-$KERNEL.XXXXXX")
	CLEANUP_PATHS+=("$tmp")
	chmod 755 "$tmp"
	note "preparing kernel $KERNEL in $KDIR (one-time)"

	local dl=$tmp/download
	mkdir -p "$dl"
	case "$KERNEL" in
	6.1)
		local system_has_bookworm=0
		if grep -rqsE '^[^#]*\bbookworm\b' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null; then
			system_has_bookworm=1
		fi
		if ((system_has_bookworm)) && { ((EUID == 0)) || ((${#SUDO[@]})); }; then
			APT_OPTS=()
		else
			private_apt "$tmp/apt" "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-updates main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main"
			SUDO=()
			quietly apt-get "${APT_OPTS[@]}" update -q || die "apt-get update (private bookworm sources) failed"
		fi
		(cd "$dl" && fetch_kernel_package '^linux-image-6\.1\.0-[0-9]+-cloud-amd64$' \
			'^linux-image-6\.1\.0-[0-9]+-cloud-amd64-unsigned$' update-ok)
		;;
	6.18)
		private_apt "$tmp/apt" "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie-backports main"
		local sudo_saved=("${SUDO[@]}")
		SUDO=()
		quietly apt-get "${APT_OPTS[@]}" update -q || die "apt-get update (private trixie-backports sources) failed"
		(cd "$dl" && fetch_kernel_package '^linux-image-6\.18[^ ]*-cloud-amd64$' \
			'^linux-image-6\.18[^ ]*-cloud-amd64-unsigned$' no-update)
		SUDO=("${sudo_saved[@]}")
		;;
	esac

	local deb
	deb=$(find "$dl" -maxdepth 1 -name '*.deb' -print -quit)
	[[ -n $deb ]] || die "kernel package download produced no .deb"
	local x=$tmp/extract
	dpkg-deb -x "$deb" "$x"

	local vmlinuz release
	vmlinuz=$(find "$x/boot" -maxdepth 1 -name 'vmlinuz-*' -print -quit 2>/dev/null || true)
	[[ -n $vmlinuz ]] || die "$(basename "$deb") has no boot/vmlinuz-* (wrong package?)"
	release=${vmlinuz##*/vmlinuz-}
	local mods="" d
	for d in "$x/lib/modules/$release" "$x/usr/lib/modules/$release"; do
		if [[ -d $d ]]; then mods=$d; fi
	done
	[[ -n $mods ]] || die "$(basename "$deb") has no modules for $release"
	# depmod/modprobe -b look under <base>/lib/modules; normalise a /usr/lib/modules layout.
	if [[ $mods == "$x/usr/lib/modules/$release" ]]; then
		mkdir -p "$x/lib/modules"
		mv "$mods" "$x/lib/modules/$release"
		mods=$x/lib/modules/$release
	fi
	if [[ -n $(find "$mods" \( -name '*.ko.zst' -o -name '*.ko.gz' \) -print -quit) ]]; then
		die "modules compressed with zstd/gzip are not handled (only .ko.xz)"
	fi

	# Full-tree depmod, then ask modprobe for the closure of the guest modules.
	quietly depmod -b "$x" "$release" || die "depmod failed"
	local out=$tmp/out
	local omods=$out/lib/modules/$release
	mkdir -p "$omods"
	local rel
	for rel in "${KEEP_MODULE_DIRS[@]}"; do
		if [[ -d $mods/$rel ]]; then
			mkdir -p "$omods/$(dirname "$rel")"
			cp -a "$mods/$rel" "$omods/$rel"
		fi
	done
	local m line path
	for m in "${GUEST_MODULES[@]}"; do
		while IFS= read -r line; do
			[[ $line == insmod\ * ]] || continue
			path=${line#insmod }
			path=${path%% *}
			rel=${path#"$mods"/}
			if [[ ! -e $omods/$rel ]]; then
				mkdir -p "$omods/$(dirname "$rel")"
				cp -a "$path" "$omods/$rel"
			fi
		done < <(modprobe -d "$x" -S "$release" --show-depends "$m" 2>/dev/null || true)
	done
	local f
	for f in modules.order modules.builtin modules.builtin.modinfo; do
		if [[ -f $mods/$f ]]; then cp -a "$mods/$f" "$omods/$f"; fi
	done
	# Busybox modprobe wants plain .ko files.
	find "$omods" -name '*.ko.xz' -exec xz -d {} +
	if [[ -f $omods/modules.order ]]; then
		sed -i 's/\.ko\.xz$/.ko/' "$omods/modules.order"
		local kept
		kept=$(mktemp "$tmp/order.XXXXXX")
		while IFS= read -r line; do
			if [[ -e $omods/$line ]]; then printf '%s\n' "$line"; fi
		done <"$omods/modules.order" >"$kept"
		mv "$kept" "$omods/modules.order"
	fi
	quietly depmod -b "$out" "$release" || die "depmod failed"
	cp "$vmlinuz" "$out/vmlinuz"
	echo "$release" >"$out/release"
	printf '%s %s\n' "$(dpkg-deb -f "$deb" Package)" "$(dpkg-deb -f "$deb" Version)" >"$out/package"
	chmod -R u+rwX,go+rX "$out"

	rm -rf -- "$KDIR"
	mv "$out" "$KDIR"
	note "kernel $KERNEL ready: $(cat "$KDIR/package") ($(du -sh "$KDIR" | cut -f1))"
}

# One preparer at a time per kernel; a finished cache is just reused.
exec 9>"$CACHE_ROOT/.lock-$KERNEL"
flock 9
if [[ ! -f $KDIR/vmlinuz || ! -f $KDIR/release || ! -f $KDIR/package ]]; then
	prepare_kernel
fi
flock -u 9
exec 9>&-
RELEASE=$(cat "$KDIR/release")

if ((PREPARE_ONLY)); then
	note "kernel $KERNEL cached at $KDIR: $(cat "$KDIR/package")"
	exit 0
fi

# ---------------------------------------------------------------------------
# Probe: compile scripts/ktls-probe.c into the cache when missing or stale.
if ((PROBE)); then
	probe_src=$SCRIPT_DIR/ktls-probe.c
	probe_bin=$CACHE_ROOT/probe/ktls-probe
	[[ -f $probe_src ]] || die "missing $probe_src"
	if [[ ! -x $probe_bin || $probe_src -nt $probe_bin ]]; then
		mkdir -p "$CACHE_ROOT/probe"
		gcc -O2 -Wall -Wextra -o "$probe_bin.tmp.$$" "$probe_src" || die "compiling $probe_src failed"
		mv -f "$probe_bin.tmp.$$" "$probe_bin"
	fi
	PROGRAM=$probe_bin
fi

# ---------------------------------------------------------------------------
# 3. initramfs for this run.
if [[ $PROGRAM != */* ]]; then
	resolved=$(command -v -- "$PROGRAM" || true)
	[[ $resolved == /* ]] || die "program '$PROGRAM' not found in PATH"
	PROGRAM=$resolved
fi
[[ -f $PROGRAM && -x $PROGRAM ]] || die "program '$PROGRAM' is not an executable file"
PROG_NAME=$(basename "$PROGRAM")
[[ $PROG_NAME != busybox ]] || die "the program may not be called 'busybox'"

RUN=$(mktemp -d "$CACHE_ROOT/.run-$KERNEL.XXXXXX")
CLEANUP_PATHS+=("$RUN")
ROOT=$RUN/root
mkdir -p "$ROOT"/{bin,sbin,dev,proc,sys,tmp,etc,lib,mnt}

BUSYBOX=/bin/busybox
if ldd "$BUSYBOX" >/dev/null 2>&1; then
	die "$BUSYBOX is dynamically linked; install busybox-static"
fi
cp "$BUSYBOX" "$ROOT/bin/busybox"
while IFS= read -r applet; do
	if [[ -n $applet && $applet != busybox ]]; then
		ln -sf busybox "$ROOT/bin/$applet"
	fi
done < <("$BUSYBOX" --list)
for applet in sh mount ip modprobe cat poweroff echo mkdir sleep; do
	[[ -e $ROOT/bin/$applet ]] || ln -s busybox "$ROOT/bin/$applet"
done

# The kernel auto-loads crypto algorithms (e.g. "crypto-chacha20" for the rfc7539 template)
# through /proc/sys/kernel/modprobe, which is /sbin/modprobe.
ln -s ../bin/busybox "$ROOT/sbin/modprobe"
cp -a "$KDIR/lib/modules" "$ROOT/lib/"

# Copy every library ldd lists for $1 to the same path inside the initramfs.
copy_libs() {
	local out lib
	if ! out=$(ldd "$1" 2>&1); then
		return 0 # static executable or not an ELF file
	fi
	if grep -q 'not found' <<<"$out"; then
		die "ldd $1: missing libraries:"$'\n'"$(grep 'not found' <<<"$out")"
	fi
	while IFS= read -r lib; do
		if [[ ! -e $ROOT$lib ]]; then
			mkdir -p "$ROOT$(dirname "$lib")"
			cp -L "$lib" "$ROOT$lib"
		fi
	done < <(grep -o '/[^ ]*' <<<"$out")
}

rm -f "$ROOT/bin/$PROG_NAME"
cp -L "$PROGRAM" "$ROOT/bin/$PROG_NAME"
copy_libs "$PROGRAM"

for spec in "${FILES[@]}"; do
	src=${spec%:*}
	dst=${spec##*:}
	[[ -e $src ]] || die "--file: '$src' does not exist"
	mkdir -p "$ROOT$(dirname "$dst")"
	rm -rf -- "${ROOT:?}$dst"
	cp -aL "$src" "$ROOT$dst"
	if [[ -f $src && -x $src ]]; then
		copy_libs "$src"
	fi
done

# The guest mounts a tmpfs on /tmp; files aimed there are staged and copied in after the mount.
if [[ -n $(ls -A "$ROOT/tmp") ]]; then
	mv "$ROOT/tmp" "$ROOT/.ktern-tmp"
	mkdir "$ROOT/tmp"
fi

# POSIX single-quoting, safe for any byte except NUL.
shquote() {
	local s=${1//\'/\'\\\'\'}
	printf "'%s'" "$s"
}

{
	cat <<'EOF'
#!/bin/busybox sh
export PATH=/bin
bb=/bin/busybox
$bb mount -t proc proc /proc
$bb mount -t sysfs sysfs /sys
$bb mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
$bb mount -t tmpfs tmpfs /tmp
if [ -d /.ktern-tmp ]; then $bb cp -a /.ktern-tmp/. /tmp/; fi
$bb ip link set lo up
# SeaBIOS's serial console may leave its last line unterminated: start on a fresh line.
echo
echo "ktls-vm: guest kernel $($bb uname -r) up"
EOF
	printf 'for m in %s; do\n' "${GUEST_MODULES[*]}"
	cat <<'EOF'
	$bb modprobe "$m" || echo "ktls-vm: modprobe $m failed (status $?)"
done
EOF
	printf 'export KTERN_IN_VM=1 KTERN_VM_KERNEL=%s RUST_BACKTRACE=1 HOME=/tmp TMPDIR=/tmp\n' "$KERNEL"
	for spec in "${ENVS[@]}"; do
		printf 'export %s=%s\n' "${spec%%=*}" "$(shquote "${spec#*=}")"
	done
	printf 'cd /tmp\n'
	printf 'set --'
	for a in "${PROG_ARGS[@]}"; do
		printf ' %s' "$(shquote "$a")"
	done
	printf '\n'
	printf '%s "$@"\n' "$(shquote "/bin/$PROG_NAME")"
	cat <<'EOF'
rc=$?
echo
echo "KTERN-VM-EXIT=$rc"
$bb sleep 0.2 2>/dev/null || $bb sleep 1
$bb poweroff -f
EOF
} >"$ROOT/init"
chmod 755 "$ROOT/init"

# Uncompressed: the guest unpacks gzip slowly under TCG (a 117 MiB payload booted ~6 s
# faster uncompressed, a small one ~1 s faster), and the kernel accepts a plain newc cpio.
(cd "$ROOT" && find . -print0 | cpio --null -o -H newc --quiet -R 0:0) >"$RUN/initrd.cpio"

# ---------------------------------------------------------------------------
# 4. Boot. Console -> sed (strip CR) -> tee (stdout + log), streamed as it comes.
# The exit status is read from this run's own log (two runs on one kernel at
# once must not read each other's); last-KERNEL.log gets a copy at the end.
LOG=$CACHE_ROOT/last-$KERNEL.log
RUN_LOG=$RUN/console.log
EXTRA_QEMU=()
if [[ -n ${KTERN_VM_QEMU_ARGS:-} ]]; then
	read -r -a EXTRA_QEMU <<<"$KTERN_VM_QEMU_ARGS"
fi
note "booting $(cat "$KDIR/package") (kernel $RELEASE, ${MEM} MiB, timeout ${TIMEOUT}s): $PROG_NAME${PROG_ARGS[*]:+ ${PROG_ARGS[*]}}"

mkfifo "$RUN/console"
# Also drop the terminal escapes SeaBIOS prints (screen clears).
sed -u -e 's/\r//g' -e 's/\x1b\[[0-9;?]*[A-Za-z]//g' -e 's/\x1bc//g' <"$RUN/console" | tee "$RUN_LOG" &
READER_PID=$!
start=$(date +%s.%N)
timeout --foreground -k 10 "$TIMEOUT" \
	qemu-system-x86_64 -accel tcg -cpu max -m "$MEM" -smp 1 -nographic -no-reboot -net none \
	-kernel "$KDIR/vmlinuz" -initrd "$RUN/initrd.cpio" \
	-append "console=ttyS0 quiet panic=-1${KTERN_VM_APPEND:+ $KTERN_VM_APPEND}" "${EXTRA_QEMU[@]}" \
	</dev/null >"$RUN/console" 2>&1 &
VM_PID=$!
vm_rc=0
wait "$VM_PID" || vm_rc=$?
VM_PID=""
wait "$READER_PID" || true
end=$(date +%s.%N)
elapsed=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
cp "$RUN_LOG" "$LOG"

status=$(grep -a -E '^KTERN-VM-EXIT=[0-9]+$' "$RUN_LOG" | tail -n 1 | cut -d= -f2 || true)
if [[ -z $status ]]; then
	if ((vm_rc == 124 || vm_rc == 137)); then
		note "FAILED: VM timed out after ${TIMEOUT}s with no KTERN-VM-EXIT marker (log: $LOG)"
	else
		note "FAILED: no KTERN-VM-EXIT marker (qemu status $vm_rc; kernel panic or boot failure?) (log: $LOG)"
	fi
	exit 125
fi
note "guest program exited with status $status after ${elapsed}s (log: $LOG)"
exit "$status"
