# shellcheck shell=sh disable=SC2034 # SCENARIO_* are read by ci/vm-test
# Runner selftest: the guest side fails on purpose, so `ci/vm-test --selftest`
# can check that a failing scenario is reported as a failure with its detail.
# Not part of the default set (selftest-* names are excluded).
SCENARIO_TIMEOUT=60
SCENARIO_EXPECT=fail

scenario_guest() {
    echo "deliberate failure from selftest-fail" >"$KITE_DETAIL"
    return 1
}
