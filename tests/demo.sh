#!/bin/sh
# The main job: the example VM launched in the background through cellvm-jailer with
# every layer on, then managed with cellvmctl: listed, inspected, paused and resumed,
# its counters read, and shut down through its ACPI power button. The guest's check
# lines are shown from the console log; any FAIL, or a step that fails, fails the job.
set -eu
cd "$(dirname "$0")/.."
bin=target/x86_64-unknown-linux-gnu/release
ctl=$bin/cellvmctl
id=$($ctl launch --policy policy/tenants/example.toml --vm policy/vms/example-background.toml)
log=/run/cellvm/vm/$id/console.log
trap '$ctl destroy "$id" >/dev/null 2>&1 || true' EXIT
echo "== launched $id in the background"
# The checks are done once the guest starts ticking.
n=0
until grep -q '^tick 1' "$log" 2>/dev/null; do
    n=$((n + 1))
    [ $n -le 300 ] || { echo "demo: the guest did not finish its checks in 30 s" >&2; exit 1; }
    sleep 0.1
done
grep -E '^(TEST|cellvm-testguest)' "$log"
echo "== cellvmctl list"; $ctl list
echo "== cellvmctl info $id"; $ctl info "$id"
echo "== cellvmctl pause / resume"
$ctl pause "$id"
a=$(grep -c '^tick' "$log"); sleep 0.5; b=$(grep -c '^tick' "$log")
echo "ticks while paused for 0.5 s: $((b - a))"
$ctl resume "$id"
sleep 0.5; c=$(grep -c '^tick' "$log")
echo "ticks in 0.5 s after resume: $((c - b))"
echo "== cellvmctl stats $id"; $ctl stats "$id"
grep -q '^TEST power-button' "$log" && { echo "demo: power button pressed early" >&2; exit 1; }
echo "== cellvmctl shutdown $id"
grep -E '^TEST' "$log" > /tmp/cellvm-demo-$id.tests || true
$ctl shutdown "$id" --timeout 10
trap - EXIT
passed=$(grep -c ' PASS' /tmp/cellvm-demo-$id.tests || true)
failed=$(grep -c ' FAIL' /tmp/cellvm-demo-$id.tests || true)
rm -f /tmp/cellvm-demo-$id.tests
echo "== guest checks: $passed passed, $failed failed; paused ticks $((b - a)), resumed ticks $((c - b))"
[ "$failed" -eq 0 ] && [ "$passed" -gt 0 ] && [ $((b - a)) -le 1 ] && [ $((c - b)) -ge 2 ]
