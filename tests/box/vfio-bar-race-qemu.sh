#!/bin/sh
# SPDX-License-Identifier: GPL-2.0-only
#
# vfio-bar-race-qemu: the v1 reproducer with the real VMM (issue 14, section 4). Runs on L1 (the
# test box, POSIX sh for busybox): binds edu (1234:11e8) to vfio-pci, gives it to an L2 guest of
# QEMU (-accel kvm -device vfio-pci), and lets L2's PID 1 (tests/box/bar_race_guest.c) hammer
# BAR0 through its sysfs mmap on one vCPU while the other toggles PCI_COMMAND.MEM.
#
# Cells: stock   = the stock QEMU, race
#        patched = the patched QEMU, race
#        handler = a QEMU with the series' memory-fault handling but not its last patch (which
#                  takes the BAR's mmaps off before MEM=0 reaches the device, so that the
#                  guest's own toggles never fault): the kernel half's exit, handled (not run
#                  unless --cells names it; --qemu-handler)
#        control = the stock QEMU, no race (the guest's MMIO loop pauses around each MEM=0
#                  phase): how long the nested stack itself survives the same memslot churn.
#        patched-control = the patched QEMU, no race (not run unless --cells names it): tells
#                  a hang of the nested stack from one of stock QEMU's ordering.
#
# One line per cell:
#   cell=NAME outcome=survived|died|hung|panicked|error toggles=N memfault_exits=N deaths=N
#   hangs=N panics=N ops=N dev_reads=N ones_reads=N other_reads=N seconds=S detail="..."
# and the last line:
#   vfio-bar-race-qemu: result=PASS|FAIL|ERROR|SKIP <cell>_<key>=N ... detail="..."
# Exit status: 0 PASS, 1 FAIL, 2 ERROR (environment), 4 SKIP (no usable device/IOMMU group).
#
# Each of the patched and (when run) handler cells is judged against the control, and the
# worse of the two is the result. PASS: it did not die (every KVM_EXIT_MEMORY_FAULT handled),
# read only the device's ID or all ones, and survived every cycle or got at least as many
# toggles as the control. FAIL: it died, read anything else, or stopped early where the
# control survived. ERROR: it hung/panicked first and so did the control (an environment
# failure, not the series').

set -u

QEMU_STOCK=
QEMU_PATCHED=
QEMU_HANDLER=
KERNEL=
GUEST=
BDF=auto
CYCLES=200
DURATION=
CELLS=stock,patched,control
TIMEOUT=
BOOT_TIMEOUT=300
STALL=60
FIRMWARE=
FIRMWARE_FILES=
WORKDIR=
L2_APPEND=
PROGRESS=10
SMP=2
MEM=128

EXIT_PASS=0
EXIT_FAIL=1
EXIT_ERROR=2
EXIT_SKIP=4

usage() {
	cat <<EOF
usage: $0 --qemu-stock PATH --qemu-patched PATH [--qemu-handler PATH] --kernel PATH --guest PATH
          [--bdf auto|BDF] [--cycles N] [--duration S] [--cells stock,patched,control]
          [--timeout S] [--boot-timeout S] [--stall S] [--firmware DIR|NAME=PATH]... [--workdir DIR]
          [--append ARGS]
  --qemu-stock PATH    QEMU without the series (stock and control cells)
  --qemu-patched PATH  QEMU with the series (patched cell)
  --qemu-handler PATH  QEMU with the memory-fault handling, not the mmap ordering (handler cell)
  --kernel PATH        L2's bzImage
  --guest PATH         bar_race_guest (static), L2's /init
  --bdf BDF            the device (default auto: the first 1234:11e8)
  --cycles N           MEM toggles per cell (default $CYCLES)
  --duration S         toggle for S seconds instead
  --cells LIST         which cells, in order (default $CELLS)
  --timeout S          per cell (default: boot timeout + 2 s per cycle, or duration + boot)
  --boot-timeout S     allowance for L2's boot (default $BOOT_TIMEOUT)
  --stall S            hung once L2's console (a line every 10 toggles) is silent for S
                       seconds after the test started (default $STALL; 0: only --timeout)
  --firmware DIR       QEMU -L (default: the QEMU binary's directory if bios-256k.bin is there);
  --firmware NAME=PATH  (repeatable) a file QEMU finds as NAME in its -L: a directory of links
  --workdir DIR        logs and L2's initramfs (default /tmp/vfio-bar-race-qemu)
  --append ARGS        more of L2's kernel command line
EOF
}

say() { echo "vfio-bar-race-qemu: $*"; }

finish() {	# RESULT EXIT DETAIL [KEYS]
	echo "vfio-bar-race-qemu: result=$1${4:+ $4} detail=\"$3\""
	exit "$2"
}

skip() { finish SKIP $EXIT_SKIP "$1"; }
error() { finish ERROR $EXIT_ERROR "$1" "${2:-}"; }

while [ $# -gt 0 ]; do
	case "$1" in
	--qemu-stock) QEMU_STOCK=$2; shift ;;
	--qemu-patched) QEMU_PATCHED=$2; shift ;;
	--qemu-handler) QEMU_HANDLER=$2; shift ;;
	--kernel) KERNEL=$2; shift ;;
	--guest) GUEST=$2; shift ;;
	--bdf) BDF=$2; shift ;;
	--cycles) CYCLES=$2; shift ;;
	--duration) DURATION=$2; shift ;;
	--cells) CELLS=$2; shift ;;
	--timeout) TIMEOUT=$2; shift ;;
	--boot-timeout) BOOT_TIMEOUT=$2; shift ;;
	--stall) STALL=$2; shift ;;
	--firmware)
		case $2 in
		*=*) FIRMWARE_FILES="$FIRMWARE_FILES $2" ;;
		*) FIRMWARE=$2 ;;
		esac
		shift ;;
	--workdir) WORKDIR=$2; shift ;;
	--append) L2_APPEND=$2; shift ;;
	-h|--help) usage; exit 0 ;;
	*) usage >&2; error "unknown argument '$1'" ;;
	esac
	shift
done

# ---- arguments ----
case ",$CELLS," in *,stock,*|*,control,*) need_stock=1 ;; *) need_stock=0 ;; esac
case ",$CELLS," in *,patched,*|*,patched-control,*) need_patched=1 ;; *) need_patched=0 ;; esac
for c in $(echo "$CELLS" | tr ',' ' '); do
	case "$c" in stock|patched|handler|control|patched-control) ;; *) error "unknown cell '$c'" ;; esac
done
[ "$need_stock" = 0 ] || [ -x "$QEMU_STOCK" ] || error "--qemu-stock '$QEMU_STOCK' is not executable"
[ "$need_patched" = 0 ] || [ -x "$QEMU_PATCHED" ] ||
	error "--qemu-patched '$QEMU_PATCHED' is not executable"
case ",$CELLS," in
*,handler,*) [ -x "$QEMU_HANDLER" ] || error "--qemu-handler '$QEMU_HANDLER' is not executable" ;;
esac
[ -r "$KERNEL" ] || error "--kernel '$KERNEL' is not readable"
[ -r "$GUEST" ] || error "--guest '$GUEST' is not readable"
case "$CYCLES" in ''|*[!0-9]*) error "--cycles '$CYCLES' is not a number" ;; esac
case "$DURATION" in *[!0-9]*) error "--duration '$DURATION' is not a number" ;; esac
case "$STALL" in ''|*[!0-9]*) error "--stall '$STALL' is not a number" ;; esac
if [ -z "$TIMEOUT" ]; then
	if [ -n "$DURATION" ]; then
		TIMEOUT=$((BOOT_TIMEOUT + DURATION + 60))
	else
		TIMEOUT=$((BOOT_TIMEOUT + 2 * CYCLES))
	fi
fi
[ -n "$WORKDIR" ] || WORKDIR=/tmp/vfio-bar-race-qemu
mkdir -p "$WORKDIR" || error "cannot make $WORKDIR"
if [ -n "$FIRMWARE_FILES" ]; then	# NAME=PATH: the files QEMU looks up by name in its -L
	FIRMWARE=$WORKDIR/firmware
	mkdir -p "$FIRMWARE" || error "cannot make $FIRMWARE"
	for f in $FIRMWARE_FILES; do
		[ -r "${f#*=}" ] || error "--firmware $f: not readable"
		ln -sf "${f#*=}" "$FIRMWARE/${f%%=*}"
	done
fi

# ---- the device ----
hex() { v=$(cat "$1" 2>/dev/null) || v=; echo "$v"; }

if [ "$BDF" = auto ]; then
	BDF=
	for d in /sys/bus/pci/devices/*; do
		if [ "$(hex "$d/vendor")" = 0x1234 ] && [ "$(hex "$d/device")" = 0x11e8 ]; then
			BDF=${d##*/}
			break
		fi
	done
	[ -n "$BDF" ] || skip "no 1234:11e8 (QEMU edu) device in /sys/bus/pci/devices"
fi
DEV=/sys/bus/pci/devices/$BDF
[ -e "$DEV" ] || skip "no PCI device $BDF"

driver_of() { l=$(readlink "$1/driver" 2>/dev/null) && echo "${l##*/}"; }

# Bind as tests/box/vfio_bar_race.c --bind does: driver_override, unbind, drivers_probe.
drv=$(driver_of "$DEV")
if [ "$drv" != vfio-pci ]; then
	echo vfio-pci > "$DEV/driver_override" 2>/dev/null ||
		error "cannot write $DEV/driver_override"
	[ -z "$drv" ] || echo "$BDF" > "$DEV/driver/unbind" 2>/dev/null
	echo "$BDF" > /sys/bus/pci/drivers_probe 2>/dev/null
	drv=$(driver_of "$DEV")
	[ "$drv" = vfio-pci ] ||
		skip "$BDF did not bind to vfio-pci (CONFIG_VFIO_PCI? an IOMMU?)"
	say "bound $BDF to vfio-pci"
fi
grp=$(readlink "$DEV/iommu_group" 2>/dev/null) ||
	skip "$BDF has no iommu_group (no IOMMU: QEMU's vfio has no noiommu support)"
grp=${grp##*/}
[ -e "/dev/vfio/$grp" ] ||
	skip "no /dev/vfio/$grp (a noiommu group? QEMU's vfio needs a real IOMMU group)"
for d in /sys/kernel/iommu_groups/"$grp"/devices/*; do
	[ "${d##*/}" = "$BDF" ] && continue
	[ "$(driver_of "$d")" = vfio-pci ] ||
		skip "IOMMU group $grp is not viable: ${d##*/} is not bound to vfio-pci"
done
[ -c /dev/kvm ] || skip "no /dev/kvm on this box"

# ---- L2's initramfs: /init = the guest program ----
INITRD=$WORKDIR/l2-initramfs.cpio
rm -rf "$WORKDIR/l2-root"
mkdir -p "$WORKDIR/l2-root/dev" "$WORKDIR/l2-root/proc" "$WORKDIR/l2-root/sys" ||
	error "cannot make $WORKDIR/l2-root"
cp "$GUEST" "$WORKDIR/l2-root/init" && chmod 755 "$WORKDIR/l2-root/init" ||
	error "cannot copy $GUEST"
mknod "$WORKDIR/l2-root/dev/console" c 5 1 2>/dev/null
(cd "$WORKDIR/l2-root" && find . | cpio -o -H newc > "$INITRD" 2>/dev/null) ||
	error "cpio -o -H newc failed"
[ -s "$INITRD" ] || error "empty $INITRD"

# ---- one cell ----
# What QEMU prints when it stops the VM or gives up on it.
DEATH='kvm run failed|Convert non guest_memfd|KVM could not fault in|KVM_EXIT_MEMORY_FAULT:|KVM internal error|^RAX=|Bus error'

last_num() {	# KEY FILE: the number of the last KEY=N in FILE
	sed -n "s/.*[ :]$1=\([0-9][0-9]*\).*/\1/p" "$2" 2>/dev/null | tail -n 1
}

run_cell() {	# NAME QEMU MODE
	name=$1 qemu=$2 mode=$3
	con=$WORKDIR/$name.console
	err=$WORKDIR/$name.qemu.log
	trc=$WORKDIR/$name.trace
	mon=$WORKDIR/$name.mon
	rm -f "$con" "$err" "$trc" "$mon.in" "$mon.out" "$WORKDIR/$name.regs"
	monitor=none
	mkfifo "$mon.in" "$mon.out" 2>/dev/null && monitor=pipe:$mon
	if [ -n "$DURATION" ]; then
		soak="bar_race.duration=$DURATION"
	else
		soak="bar_race.cycles=$CYCLES"
	fi
	fw=$FIRMWARE
	[ -n "$fw" ] || { [ -e "${qemu%/*}/bios-256k.bin" ] && fw=${qemu%/*}; }
	append="console=ttyS0 panic=-1 bar_race.mode=$mode $soak bar_race.progress=$PROGRESS"
	append="$append${L2_APPEND:+ $L2_APPEND}"
	t0=$(date +%s)
	"$qemu" ${fw:+-L "$fw"} -accel kvm -machine pc -cpu qemu64 -smp "$SMP" -m "$MEM" \
		-nodefaults -display none -action reboot=shutdown,shutdown=pause \
		-monitor "$monitor" -serial "file:$con" \
		-kernel "$KERNEL" -initrd "$INITRD" -append "$append" \
		-device "vfio-pci,host=$BDF" \
		-trace 'kvm_memory_fault*' -trace 'vfio_pci_memory_fault*' \
		-trace 'memory_region_ram_device_bus_error*' -D "$trc" \
		> "$err" 2>&1 < /dev/null &
	pid=$!
	outcome= rc= detail= boot_wall= last_sz= last_t=0
	while :; do
		sleep 1
		now=$(date +%s)
		el=$((now - t0))
		if [ -z "$boot_wall" ] && grep -aq 'start uptime=' "$con" 2>/dev/null; then
			boot_wall=$el
		fi
		if ! kill -0 "$pid" 2>/dev/null; then
			wait "$pid"; rc=$?
			break
		fi
		if grep -aq 'result=[A-Z]' "$con" 2>/dev/null; then
			sleep 1; stop_qemu; break	# it powers off by itself (and pauses: see -action)
		fi
		if grep -aq 'Kernel panic' "$con" 2>/dev/null; then
			sleep 2; stop_qemu; outcome=panicked; break
		fi
		if grep -Eq "$DEATH" "$err" 2>/dev/null; then
			sleep 1; stop_qemu; outcome=died; break
		fi
		if [ "$el" -ge "$TIMEOUT" ]; then
			thr=$(threads_of "$pid") rips=$(l2_rips)
			stop_qemu; outcome=hung
			detail="no result line after ${el}s; L2 RIP $rips; QEMU threads $thr"
			break
		fi
		sz=$(wc -c < "$con" 2>/dev/null)
		if [ "$sz" != "$last_sz" ]; then
			last_sz=$sz last_t=$el
		elif [ $(((el - last_t) % 5)) = 3 ] &&
		     [ "$(mon_cmd 'info status' status)" = "VM status: paused (shutdown)" ]; then
			# -action: L2 reset itself (a triple fault, or a reboot) or powered off with
			# no result line; QEMU paused it as it was, so its registers tell where
			rips=$(l2_rips)
			stop_qemu; outcome=panicked
			detail="L2 reset with no panic message (a triple fault?); L2 RIP $rips"
			break
		fi
		if [ -n "$boot_wall" ] && [ "$STALL" -gt 0 ] && [ $((el - last_t)) -ge "$STALL" ]; then
			thr=$(threads_of "$pid") rips=$(l2_rips)
			stop_qemu; outcome=hung
			detail="L2's console silent for $((el - last_t))s; L2 RIP $rips; QEMU threads $thr"
			break
		fi
		if [ -z "$boot_wall" ] && [ "$el" -ge "$BOOT_TIMEOUT" ]; then
			stop_qemu; outcome=hung; detail="L2 did not reach /init in ${el}s"; break
		fi
	done
	seconds=$(( $(date +%s) - t0 ))
	res=$(grep -a 'result=[A-Z]' "$con" 2>/dev/null | tail -n 1)
	gres=$(echo "$res" | sed -n 's/.*result=\([A-Z]*\).*/\1/p')
	if [ -z "$outcome" ]; then
		if grep -Eq "$DEATH" "$err" 2>/dev/null; then
			outcome=died
		elif grep -aq 'Kernel panic' "$con" 2>/dev/null; then
			outcome=panicked
		elif grep -aq 'MMIO thread is stuck' "$con" 2>/dev/null; then
			outcome=hung
			detail="L2's MMIO thread stopped: $(grep -a -o 'stuck at ops=[0-9]*' "$con")"
		elif [ "$gres" = PASS ] || [ "$gres" = FAIL ]; then
			outcome=survived
		elif [ "$gres" = SKIP ]; then
			outcome=error
			detail=$(grep -a 'bar-race-guest:' "$con" | tail -n 2 | head -n 1)
		elif [ -n "$rc" ] && [ "$rc" -gt 128 ]; then
			outcome=died; detail="QEMU killed by signal $((rc - 128))"
		elif grep -aq 'start uptime=' "$con" 2>/dev/null; then
			outcome=died; detail="QEMU exited ($rc) during the run"
		else
			outcome=error; detail="QEMU exited ($rc) before L2 ran the test"
		fi
	fi
	if [ -z "$detail" ]; then
		case "$outcome" in
		died|error) detail=$(grep -E "$DEATH|rror" "$err" | grep -v '^RAX=' | head -n 2 |
				     tr '\n' ' ') ;;
		panicked) detail=$(grep -a -m 1 -A 2 'Kernel panic\|BUG:\|Oops' "$con" | head -n 3 |
				   tr '\n' ' ') ;;
		esac
		[ -n "$detail" ] || [ "$outcome" = survived ] ||
			detail=$(tail -n 2 "$err" "$con" 2>/dev/null | tr '\n' ' ')
	fi
	# A death during the run: the signal, if that was it.
	if [ "$outcome" = died ] && [ -n "$rc" ] && [ "$rc" -gt 128 ]; then
		case "$detail" in *signal*) ;; *) detail="QEMU killed by signal $((rc - 128)); $detail" ;; esac
	fi
	if [ -n "$res" ]; then
		toggles=$(last_num toggles "$con")
		ops=$(echo "$res" | sed -n 's/.* ops=\([0-9]*\).*/\1/p')
		devr=$(echo "$res" | sed -n 's/.* dev_reads=\([0-9]*\).*/\1/p')
		ones=$(echo "$res" | sed -n 's/.* ones_reads=\([0-9]*\).*/\1/p')
		other=$(echo "$res" | sed -n 's/.* other_reads=\([0-9]*\).*/\1/p')
		gsec=$(echo "$res" | sed -n 's/.* seconds=\([0-9.]*\).*/\1/p')
	else
		toggles=$(last_num toggles "$con")
		ops=$(last_num ops "$con")
		devr=0 ones=0 other=0 gsec=
	fi
	: "${toggles:=0}" "${ops:=0}" "${devr:=0}" "${ones:=0}" "${other:=0}"
	memf=$(grep -c 'kvm_memory_fault' "$trc" 2>/dev/null)
	handled=$(grep -c 'vfio_pci_memory_fault' "$trc" 2>/dev/null)
	buserr=$(grep -c 'memory_region_ram_device_bus_error' "$trc" 2>/dev/null)
	uptime=$(sed -n 's/.*start uptime=\([0-9.]*\).*/\1/p' "$con" 2>/dev/null |
		 head -n 1)
	deaths=0 hangs=0 panics=0
	case "$outcome" in
	died) deaths=1 ;;
	hung) hangs=1 ;;
	panicked) panics=1 ;;
	esac
	extra="l2_boot=${uptime:-?}s/${boot_wall:-?}s wall, handled=${handled:-0}"
	extra="$extra, bus_errors=${buserr:-0}${gsec:+, test ${gsec}s}"
	detail=$(echo "$extra${detail:+; $detail}" | tr -d '"' | tr -s ' ' | cut -c 1-400)
	echo "cell=$name outcome=$outcome toggles=$toggles memfault_exits=${memf:-0}" \
	     "deaths=$deaths hangs=$hangs panics=$panics ops=$ops dev_reads=$devr" \
	     "ones_reads=$ones other_reads=$other seconds=$seconds detail=\"$detail\""
	case "$outcome" in	# what a developer reads first about a guest that stopped
	hung|panicked)
		tail -n 12 "$con" 2>/dev/null | tr -d '\r' | sed "s/^/  $name console: /"
		tail -n 4 "$err" 2>/dev/null | sed "s/^/  $name qemu: /"
		grep -E '^(CPU#|RSI|RIP|CS |IDT|CR0)' "$WORKDIR/$name.regs" 2>/dev/null |
			sed "s/^/  $name regs: /" ;;
	esac
	v=$(echo "$name" | tr - _)
	eval "c_${v}_outcome=$outcome c_${v}_toggles=$toggles c_${v}_other=$other"
	keys="$keys ${name}_outcome=$outcome ${name}_toggles=$toggles ${name}_memfault_exits=${memf:-0}"
	keys="$keys ${name}_deaths=$deaths ${name}_hangs=$hangs ${name}_panics=$panics"
	keys="$keys ${name}_other_reads=$other"
}

# mon_cmd COMMAND SUFFIX: the L2 QEMU monitor's answer, kept in NAME.SUFFIX; prints its
# last line.
mon_cmd() {
	[ "$monitor" != none ] || return 0
	cat "$mon.out" > "$WORKDIR/$name.$2" &
	rd=$!
	echo "$1" > "$mon.in"
	sleep 2
	kill "$rd" 2>/dev/null
	wait "$rd" 2>/dev/null
	tr -d '\r' < "$WORKDIR/$name.$2" | grep -v '^(qemu)' | grep . | tail -n 1
}

# L2's registers from QEMU's monitor (a hung or reset L2: where its vCPUs are), into
# NAME.regs; prints the RIPs.
l2_rips() {
	mon_cmd 'info registers -a' regs > /dev/null
	sed -n 's/^RIP=\([0-9a-f]*\).*/\1/p' "$WORKDIR/$name.regs" 2>/dev/null | tr '\n' ',' |
		sed 's/,$//'
}

# Where QEMU's threads are (a hung L2: is a vCPU thread spinning in KVM_RUN, or blocked?).
threads_of() {
	for t in /proc/"$1"/task/*; do
		st=$(cut -d' ' -f3,14 "$t/stat" 2>/dev/null)
		printf '%s:%s:%s ' "$(cat "$t/comm" 2>/dev/null)" "${st% *}" \
			"$(cat "$t/wchan" 2>/dev/null || echo ?)"
	done
}

stop_qemu() {
	kill "$pid" 2>/dev/null
	n=0
	while [ $n -lt 5 ] && kill -0 "$pid" 2>/dev/null; do sleep 1; n=$((n + 1)); done
	kill -9 "$pid" 2>/dev/null
	wait "$pid" 2>/dev/null
}

cleanup() { [ -z "${pid:-}" ] || kill -9 "$pid" 2>/dev/null; }
trap cleanup EXIT
trap 'cleanup; exit 2' INT TERM

say "device $BDF (IOMMU group $grp), cells $CELLS, ${DURATION:+duration ${DURATION}s}${DURATION:-cycles $CYCLES}, timeout ${TIMEOUT}s per cell, logs in $WORKDIR"
keys=
for c in $(echo "$CELLS" | tr ',' ' '); do
	case "$c" in
	stock) run_cell stock "$QEMU_STOCK" race ;;
	patched) run_cell patched "$QEMU_PATCHED" race ;;
	handler) run_cell handler "$QEMU_HANDLER" race ;;
	control) run_cell control "$QEMU_STOCK" control ;;
	patched-control) run_cell patched-control "$QEMU_PATCHED" control ;;
	esac
	pid=
done
keys=${keys# }

# ---- the verdict: the patched and handler cells', each against the control ----
# judge CELL: sets j_result (PASS, FAIL or ERROR) and j_detail for one cell that was run.
judge() {
	eval "o=\$c_${1}_outcome t=\$c_${1}_toggles other=\$c_${1}_other"
	co=${c_control_outcome:-} ct=${c_control_toggles:-0}
	j_result=ERROR
	case "$o" in
	died) j_result=FAIL j_detail="the $1 cell died after $t toggles" ;;
	error) j_detail="the $1 cell could not run" ;;
	*)
		if [ "$other" != 0 ]; then
			j_result=FAIL
			j_detail="the $1 cell read $other values that were neither the ID nor all ones"
		elif [ "$o" = survived ]; then
			j_result=PASS j_detail="the $1 cell survived all its toggles ($t)"
		else	# hung or panicked
			case "$co" in
			hung|panicked)
				if [ "$t" -ge "$ct" ]; then
					j_result=PASS
					j_detail="the $1 cell $o at toggle $t, no earlier than the control: an environment limit, no VM death"
				else
					j_detail="the $1 cell $o at toggle $t and the control $co at $ct: the environment fails without the race too"
				fi ;;
			survived)
				j_result=FAIL
				j_detail="the $1 cell $o at toggle $t where the control survived $ct" ;;
			*) j_detail="the $1 cell $o at toggle $t, and no control to compare with" ;;
			esac
		fi ;;
	esac
}

[ "$need_patched" = 1 ] || error "no patched cell: the verdict is the patched cell's" "$keys"
result=PASS detail=
for c in patched handler; do
	case ",$CELLS," in *,$c,*) ;; *) continue ;; esac
	judge "$c"
	detail="${detail:+$detail; }$j_detail"
	case "$result/$j_result" in
	*/FAIL) result=FAIL ;;
	PASS/ERROR) result=ERROR ;;
	esac
done
[ -z "${c_control_outcome:-}" ] ||
	detail="$detail; control $c_control_outcome at $c_control_toggles"
case $result in
PASS) finish PASS $EXIT_PASS "$detail" "$keys" ;;
FAIL) finish FAIL $EXIT_FAIL "$detail" "$keys" ;;
*) finish ERROR $EXIT_ERROR "$detail" "$keys" ;;
esac
