#!/bin/busybox sh
# Guest side of scripts/vm-tests.sh: runs several test binaries in one VM
# boot (booting is most of a short suite's time under TCG). Arguments are
# groups separated by "::": TEST-BINARY [FILTER...]. Each binary runs with
# --test-threads=1; the exit status is 0 only if every one passed.
status=0
run() {
	[ $# -gt 0 ] || return 0
	bin=$1
	shift
	echo "=== suite $(basename "$bin") ==="
	if "$bin" --test-threads=1 "$@"; then
		echo "=== suite $(basename "$bin"): PASS ==="
	else
		echo "=== suite $(basename "$bin"): FAIL ==="
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
