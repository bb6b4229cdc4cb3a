# shellcheck shell=sh disable=SC2034 # SCENARIO_* are read by ci/vm-test
# Runner selftest: the guest crashes its kernel through sysrq, so
# `ci/vm-test --selftest` can check that a guest panic is detected (the guest
# runs with panic=-1 and QEMU with -no-reboot, so QEMU exits at once).
SCENARIO_TIMEOUT=60
SCENARIO_EXPECT=panic

scenario_guest() {
    echo c >/proc/sysrq-trigger
    # Not reached when the panic works; a kernel without sysrq fails instead.
    echo "writing to /proc/sysrq-trigger did not panic the kernel" >"$KITE_DETAIL"
    return 1
}
