# Shared set-up for the benchmark scripts that source it: a release build,
# a scratch directory ($work) with an ECDSA P-256 certificate for localhost
# (cert.pem, key.pem), $bin for the binaries, and a $pids list killed on exit.
# Sourced from the repository root.
dpkg-query -W -f='${Status}' openssl 2>/dev/null | grep -q "ok installed" ||
  apt-get install -y -qq --no-install-recommends openssl >/dev/null
cargo build --release --quiet --bins
bin=$PWD/target/release
work=$(mktemp -d "/tmp/ktern-${bench_name:-bench}.XXXXXX")
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
ulimit -n "$(ulimit -Hn)"
openssl ecparam -name prime256v1 -genkey -noout -out "$work/key.pem"
openssl req -x509 -new -key "$work/key.pem" -subj /CN=localhost -addext subjectAltName=DNS:localhost \
  -days 2 -out "$work/cert.pem" 2>/dev/null
