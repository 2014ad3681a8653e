#!/usr/bin/env bash
# A fleet behind a real kernel ECMP router, on one machine (network
# namespaces; needs root). Topology, with PREFIX (default "kt") naming the
# namespaces PREFIX-c (client), PREFIX-r (router), PREFIX-h1, PREFIX-h2:
#
#   client 10.78.0.2 ─ router ─┬─ host1 10.78.1.2  (VIP 10.78.9.9 on lo)
#                              └─ host2 10.78.2.2  (VIP 10.78.9.9 on lo)
#
# The router hashes each TCP flow (L4 hash policy) to one host.
# Usage: scripts/ecmp-netns.sh up|down|withdraw N|restore [PREFIX]
#   withdraw N: route the VIP to the other host only (what a health
#   checker or BGP withdrawal does); restore: both again.
# Only addresses inside these namespaces are used. See scripts/README.md.
set -euo pipefail
cmd=${1:-}
p=${PREFIX:-kt}
vip=10.78.9.9
both() {
  ip -n "$p-r" route replace "$vip/32" nexthop via 10.78.1.2 dev r1 nexthop via 10.78.2.2 dev r2
}
case "$cmd" in
  up)
    "$0" down >/dev/null 2>&1 || true
    for n in c r h1 h2; do ip netns add "$p-$n"; ip -n "$p-$n" link set lo up; done
    ip link add "$p-c0" type veth peer name "$p-r0"
    ip link set "$p-c0" netns "$p-c" name c0; ip link set "$p-r0" netns "$p-r" name r0
    ip link add "$p-r1" type veth peer name "$p-h1"
    ip link set "$p-r1" netns "$p-r" name r1; ip link set "$p-h1" netns "$p-h1" name h1
    ip link add "$p-r2" type veth peer name "$p-h2"
    ip link set "$p-r2" netns "$p-r" name r2; ip link set "$p-h2" netns "$p-h2" name h2
    ip -n "$p-c" addr add 10.78.0.2/24 dev c0;   ip -n "$p-r" addr add 10.78.0.1/24 dev r0
    ip -n "$p-r" addr add 10.78.1.1/24 dev r1;   ip -n "$p-h1" addr add 10.78.1.2/24 dev h1
    ip -n "$p-r" addr add 10.78.2.1/24 dev r2;   ip -n "$p-h2" addr add 10.78.2.2/24 dev h2
    for x in "c c0" "r r0" "r r1" "r r2" "h1 h1" "h2 h2"; do
      set -- $x; ip -n "$p-$1" link set "$2" up
    done
    ip -n "$p-h1" addr add "$vip/32" dev lo; ip -n "$p-h2" addr add "$vip/32" dev lo
    ip -n "$p-h1" route add default via 10.78.1.1; ip -n "$p-h2" route add default via 10.78.2.1
    ip -n "$p-c" route add default via 10.78.0.1
    ip netns exec "$p-r" sysctl -qw net.ipv4.ip_forward=1 net.ipv4.fib_multipath_hash_policy=1
    both
    ;;
  withdraw)
    case "${2:-}" in
      1) ip -n "$p-r" route replace "$vip/32" via 10.78.2.2 dev r2 ;;
      2) ip -n "$p-r" route replace "$vip/32" via 10.78.1.2 dev r1 ;;
      *) echo "withdraw 1|2" >&2; exit 2 ;;
    esac
    ;;
  restore) both ;;
  down)
    for n in c r h1 h2; do ip netns del "$p-$n" 2>/dev/null || true; done
    ;;
  *) sed -n '2,14p' "$0" >&2; exit 2 ;;
esac
