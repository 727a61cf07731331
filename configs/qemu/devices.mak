# Devices of the minimal qemu-system-x86_64 for the nested pair test
# (configure --without-default-devices --with-devices-x86_64=THIS).
# The L2 guest runs on -machine pc with its console on the ISA serial port
# (selected by CONFIG_PC) and the assigned device through vfio-pci.
CONFIG_I440FX=y
CONFIG_VFIO_PCI=y
