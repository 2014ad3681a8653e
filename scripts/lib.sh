# Shared by scripts/test.sh and scripts/vm-tests.sh (sourced, from the
# repository root): where cargo put a build's executables. Their paths move
# with CARGO_TARGET_DIR, so they are read from cargo's JSON messages rather
# than assumed.

# The executables of the target named $1 among the JSON messages on stdin.
artifacts() {
  python3 -c 'import json,sys
want = sys.argv[1]
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == want:
        print(m["executable"])' "$1"
}

# Builds ktern (the `dev` profile, or with --release the release profile:
# fat LTO, minutes when not cached) and prints the binary's path; fails if
# cargo named none. The memory budgets run a second time against the
# release build (KTERN_TEST_BIN): an idle connection's size depends on the
# build's future layouts, and operators run that build.
ktern_binary() {
  local bin
  bin=$(cargo build "$@" --quiet --bin ktern --message-format=json | artifacts ktern)
  [ -x "$bin" ] || { echo "ktern binary (${*:-dev}) not found" >&2; return 1; }
  echo "$bin"
}
