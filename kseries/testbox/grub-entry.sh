#! /bin/sh
# kseries: the test kernel's menu entry, installed as /etc/grub.d/45_kseries by the grub-reboot
# boot method and removed (with the kernel) after the run. The kernel lives outside
# /boot/vmlinuz-*, so Debian's 10_linux never lists it: it cannot become the default entry or
# the top "simple" entry, it is booted once through grub-reboot only.
# grub-mkconfig exports GRUB_DEVICE, GRUB_DEVICE_PARTUUID, GRUB_CMDLINE_LINUX, ... to this script.
# The toolkit puts the KSERIES_* settings above this line.
set -e
. /usr/share/grub/grub-mkconfig_lib

if [ -n "${KSERIES_INITRD}" ] && [ -n "${GRUB_DEVICE_UUID}" ]; then
  root="UUID=${GRUB_DEVICE_UUID}"  # an initrd can find it by UUID
elif [ -n "${GRUB_DEVICE_PARTUUID}" ]; then
  root="PARTUUID=${GRUB_DEVICE_PARTUUID}"  # the kernel itself resolves PARTUUID=
else
  root="${GRUB_DEVICE}"
fi
image=$(make_system_path_relative_to_its_root "${KSERIES_IMAGE}")
echo "Found kseries test kernel: ${KSERIES_IMAGE}" >&2
echo "menuentry '$(echo "kseries test kernel ${KSERIES_RELEASE}" | grub_quote)' \$menuentry_id_option '${KSERIES_ID}' {"
prepare_grub_to_access_device "${GRUB_DEVICE_BOOT}" | grub_add_tab
echo "	linux	${image} root=${root} ro ${GRUB_CMDLINE_LINUX} ${KSERIES_CMDLINE}"
if [ -n "${KSERIES_INITRD}" ]; then
  echo "	initrd	$(make_system_path_relative_to_its_root "${KSERIES_INITRD}")"
fi
echo "}"
