# kprobe events for `invoke test-remote --trace`, run on the box by kseries/testbox/trace.py:
#   sh -s -- attach FUNCTION:TYPE...     TYPE: s32, s64 (the return value's) or void; prints
#                                        "probed FUNCTION SYMBOL" or "absent FUNCTION",
#                                        or "unavailable REASON" when the box cannot be traced
#   sh -s -- collect FUNCTION=SYMBOL...  prints kprobe_profile, then "== FUNCTION" and the
#                                        return probe's histogram for each; removes the probes
T=/sys/kernel/tracing
G=kseries

# Disable and remove every probe of our group (triggers first: an event that has one cannot
# be removed). Also clears what a killed run left behind.
detach_all() {
	[ -d $T/events/$G ] || return 0
	echo 0 > $T/events/$G/enable
	for t in $T/events/$G/*/trigger; do echo '!hist:keys=ret' >> "$t"; done 2>/dev/null
	sed -n "s|^[pr]:\($G/[^ ]*\) .*|-:\1|p" $T/kprobe_events |
		while read -r e; do echo "$e" >> $T/kprobe_events; done
}

event() { printf %s "$1" | tr -c 'A-Za-z0-9_' _; }

# The function's own symbol, else a gcc clone of it (name.isra.0, name.constprop.0, ...).
symbol() {
	awk -v f="$1" '$3 == f { print f; found = 1; exit }
		index($3, f ".") == 1 && !c { c = $3 }
		END { if (!found && c) print c }' /proc/kallsyms
}

case "$1" in
attach)
	shift
	[ -e $T/kprobe_events ] || mount -t tracefs nodev $T 2>/dev/null
	if [ ! -w $T/kprobe_events ]; then
		echo "unavailable no $T/kprobe_events (a kernel without CONFIG_KPROBE_EVENTS?)"
		exit 0
	fi
	detach_all
	for p; do
		f=${p%%:*} type=${p#*:}
		s=$(symbol "$f")
		e=$(event "$s")
		if [ -z "$s" ] || ! echo "p:$G/${e}_entry $s" >> $T/kprobe_events; then
			echo "absent $f"
			continue
		fi
		if [ "$type" != void ]; then
			echo "r:$G/${e}_ret $s ret=\$retval:$type" >> $T/kprobe_events
			echo 'hist:keys=ret' >> $T/events/$G/${e}_ret/trigger 2>/dev/null
		fi
		echo "probed $f $s"
	done
	[ -d $T/events/$G ] && echo 1 > $T/events/$G/enable
	;;
collect)
	shift
	[ -d $T/events/$G ] && echo 0 > $T/events/$G/enable
	cat $T/kprobe_profile
	for p; do
		echo "== ${p%%=*}"
		cat $T/events/$G/$(event "${p#*=}")_ret/hist 2>/dev/null
	done
	detach_all
	;;
esac
true
