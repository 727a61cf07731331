"""Test boxes: boot a built kernel on a box over SSH, prove it runs, run the tests, judge.

One concept per module:
- `box`: a box as configs/testboxes.toml describes it (`Box`, `TestboxConfig`);
- `ssh`: the SSH session (`Remote`): strict host keys, exec-channel commands and uploads;
- `kernel`: the kernel under test (`Kernel`), from a build manifest or a bare bzImage;
- `initramfs`: the local box's userspace image and its fixed host key;
- `qemu`: the local QEMU box's process (`QemuBox`);
- `distro`: the Debian disk image and the QEMU that boots it from its disk (`DiskBox`), a real
  box for the grub-reboot method;
- `machine`: a box being driven: session, console, power cycle (`Machine`);
- `boot`: boot methods (kexec, grub-reboot, qemu) and the identity proof;
- `mmu`: which of KVM's three MMUs the booted kernel runs, read from the box (`Kvm`);
- `suite`: the tests as data and how their programs are built;
- `runner`: running tests on the box, dmesg scan;
- `report`: verdicts, the table, report.json and junit.xml;
- `session`: one box through one kernel at a time over SSH (`BoxSession`);
- `remote`: `invoke test-remote` composed from the above (`test_remote`);
- `local`: `invoke testbox.up/down/status/console`.
"""
