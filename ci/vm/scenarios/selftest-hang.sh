# shellcheck shell=sh disable=SC2034 # SCENARIO_* are read by ci/vm-test
# Runner selftest: the guest never finishes, so `ci/vm-test --selftest` can
# check that the hard timeout kills QEMU and reports a hang.
SCENARIO_TIMEOUT=20
SCENARIO_EXPECT=timeout

scenario_guest() {
    while :; do
        sleep 60
    done
}
