#!/bin/busybox sh
# Guest side of scripts/vm-tests.sh: runs several test binaries in one VM
# boot (booting is most of a short suite's time under TCG). Arguments are
# groups separated by "::": [NAME=VALUE] TEST-BINARY [FILTER...]. Each binary
# runs with --test-threads=1, with NAME=VALUE in its environment if given; the
# exit status is 0 only if every one passed.
status=0
run() {
	[ $# -gt 0 ] || return 0
	envs=""
	case $1 in *=*) envs=$1; shift ;; esac
	bin=$1
	shift
	name="$(basename "$bin")${envs:+ ($envs)}"
	echo "=== suite $name ==="
	# Each test's time in the log (libtest's --report-time, unstable:
	# RUSTC_BOOTSTRAP lets a stable build's test binary take it), to see
	# where the guest's minutes go.
	if env RUSTC_BOOTSTRAP=1 ${envs:+"$envs"} "$bin" --test-threads=1 \
		-Z unstable-options --report-time "$@"; then
		echo "=== suite $name: PASS ==="
	else
		echo "=== suite $name: FAIL ==="
		status=1
	fi
}
group=""
set -- "$@" ::
for a in "$@"; do
	if [ "$a" = "::" ]; then
		# shellcheck disable=SC2086 # the group is split on purpose
		eval "run $group"
		group=""
	else
		group="$group '$a'"
	fi
done
exit $status
