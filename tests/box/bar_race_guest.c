// SPDX-License-Identifier: GPL-2.0-only
/*
 * bar_race_guest: PID 1 of the L2 guest in the nested kernel + QEMU pair test
 * (tests/box/vfio-bar-race-qemu.sh). It is the v1 reproducer, run inside a guest whose edu
 * device (1234:11e8) is assigned by the real VMM (QEMU's vfio-pci) on L1:
 *
 *   thread A: a 32-bit write to BAR0+4 and a 32-bit read of BAR0+0 through an mmap of
 *             sysfs resource0, in a loop; every read is counted as the device's ID (read once
 *             at the start, with MEM=1: 0x010000ed), all ones, or anything else;
 *   thread B: toggles PCI_COMMAND.MEM through the sysfs config file, with ~2 ms sleeps.
 *
 * The settings come from the kernel command line (/proc/cmdline):
 *   bar_race.cycles=N      MEM toggles (0->1 cycles) to do (default 200)
 *   bar_race.duration=S    or toggle for S seconds (overrides cycles)
 *   bar_race.mode=race     thread A runs through the MEM=0 phases (the field bug)
 *   bar_race.mode=control  thread A pauses around each MEM=0 phase: no race, the same churn
 *   bar_race.progress=N    a progress line every N toggles (default 50)
 *   bar_race.bdf=BDF       the device (default: the first edu)
 *
 * Output on the console: "bar-race-guest: start ..." (with the guest's uptime: its boot time),
 * a progress line every 50 toggles (bar_race.progress), and one last line:
 *   bar-race-guest: result=PASS|FAIL|SKIP ops=N toggles=N dev_reads=N ones_reads=N
 *                   other_reads=N seconds=S
 * PASS: every toggle done and no read other than the ID or all ones. Then it powers off (or,
 * without ACPI, reboots: the VMM runs with -no-reboot), so the VMM exits.
 *
 * Build: gcc -static -O2 -Wall -Wextra -pthread -o bar_race_guest bar_race_guest.c
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "pci_sysfs.h"

#define EDU_ID 0x010000edu
#define BAR_MAP_SIZE 0x1000
#define PCI_COMMAND 0x04
#define PCI_COMMAND_MEMORY 0x2
#define TOGGLE_SLEEP_NS 2000000L

static struct {
	unsigned long cycles;
	unsigned long duration;
	unsigned long progress;
	int control;
	char bdf[32];
} opt = { .cycles = 200, .progress = 50 };

static volatile uint32_t *bar;
static uint32_t dev_id;
static int cfg_fd = -1;

/* Shared between the threads (all through __atomic builtins). */
static int stop;
static int pause_req;
static int paused;
static int mmio_done;
static unsigned long ops, dev_reads, ones_reads, other_reads, toggles;
static uint32_t first_other;

static void say(const char *fmt, ...)
{
	char buf[512];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(buf, sizeof(buf) - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if (n > (int)sizeof(buf) - 2)
		n = sizeof(buf) - 2;
	buf[n++] = '\n';
	if (write(STDOUT_FILENO, buf, n) < 0)
		return;
}

static void sleep_ns(long ns)
{
	struct timespec ts = { .tv_sec = ns / 1000000000L, .tv_nsec = ns % 1000000000L };

	while (nanosleep(&ts, &ts) && errno == EINTR)
		;
}

static inline void cpu_relax(void)
{
	__asm__ __volatile__("pause" ::: "memory");
}

static void power_off(void)
{
	sync();
	/*
	 * A tinyconfig kernel without ACPI only halts on RB_POWER_OFF: reset instead, and the
	 * VMM's -no-reboot turns the reset into an exit.
	 */
	if (!access("/sys/firmware/acpi", F_OK))
		reboot(RB_POWER_OFF);
	reboot(RB_AUTOBOOT);
	for (;;)
		pause();
}

static void finish(const char *result, double seconds)
{
	say("bar-race-guest: result=%s ops=%lu toggles=%lu dev_reads=%lu ones_reads=%lu "
	    "other_reads=%lu seconds=%.1f", result, __atomic_load_n(&ops, __ATOMIC_RELAXED),
	    __atomic_load_n(&toggles, __ATOMIC_RELAXED), dev_reads, ones_reads, other_reads,
	    seconds);
	power_off();
}

static void skip(const char *fmt, ...)
{
	char buf[256];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	say("bar-race-guest: %s", buf);
	finish("SKIP", 0);
}

/* bar_race.KEY=VALUE from the kernel command line. */
static void parse_cmdline(void)
{
	char buf[4096], *tok, *save = NULL;

	if (read_file("/proc/cmdline", buf, sizeof(buf)))
		return;
	for (tok = strtok_r(buf, " ", &save); tok; tok = strtok_r(NULL, " ", &save)) {
		if (!strncmp(tok, "bar_race.cycles=", 16))
			opt.cycles = strtoul(tok + 16, NULL, 0);
		else if (!strncmp(tok, "bar_race.duration=", 18))
			opt.duration = strtoul(tok + 18, NULL, 0);
		else if (!strcmp(tok, "bar_race.mode=control"))
			opt.control = 1;
		else if (!strcmp(tok, "bar_race.mode=race"))
			opt.control = 0;
		else if (!strncmp(tok, "bar_race.progress=", 18))
			opt.progress = strtoul(tok + 18, NULL, 0);
		else if (!strncmp(tok, "bar_race.bdf=", 13))
			snprintf(opt.bdf, sizeof(opt.bdf), "%s", tok + 13);
	}
}

static uint16_t cmd_read(void)
{
	uint16_t v;

	if (pread(cfg_fd, &v, 2, PCI_COMMAND) != 2)
		return 0xffff;
	return v;
}

static int cmd_write(uint16_t v)
{
	return pwrite(cfg_fd, &v, 2, PCI_COMMAND) == 2 ? 0 : -1;
}

static void *mmio_thread(void *arg)
{
	unsigned long n = 0, dev = 0, ones = 0, other = 0;
	uint32_t v;

	(void)arg;
	while (!__atomic_load_n(&stop, __ATOMIC_ACQUIRE)) {
		if (__atomic_load_n(&pause_req, __ATOMIC_ACQUIRE)) {
			__atomic_store_n(&paused, 1, __ATOMIC_RELEASE);
			while (__atomic_load_n(&pause_req, __ATOMIC_ACQUIRE) &&
			       !__atomic_load_n(&stop, __ATOMIC_ACQUIRE))
				cpu_relax();
			__atomic_store_n(&paused, 0, __ATOMIC_RELEASE);
			continue;
		}
		bar[1] = (uint32_t)n;
		v = bar[0];
		if (v == dev_id) {
			dev++;
		} else if (v == 0xffffffffu) {
			ones++;
		} else {
			if (!other)
				first_other = v;
			other++;
		}
		n++;
		if (!(n & 0x3ff))
			__atomic_store_n(&ops, n, __ATOMIC_RELAXED);
	}
	__atomic_store_n(&ops, n, __ATOMIC_RELAXED);
	dev_reads = dev;
	ones_reads = ones;
	other_reads = other;
	__atomic_store_n(&mmio_done, 1, __ATOMIC_RELEASE);
	return NULL;
}

/*
 * Control mode: wait until thread A stands still outside the BAR. Both sides spin rather than
 * sleep, so that the control arms no more timers than the race does (only thread B's 2 ms
 * sleeps): a nested guest under TCG is sensitive to timer interrupts, and a control that
 * sleeps more would measure that instead.
 */
static void pause_mmio(void)
{
	__atomic_store_n(&pause_req, 1, __ATOMIC_RELEASE);
	while (!__atomic_load_n(&paused, __ATOMIC_ACQUIRE))
		cpu_relax();
}

static void resume_mmio(void)
{
	__atomic_store_n(&pause_req, 0, __ATOMIC_RELEASE);
	while (__atomic_load_n(&paused, __ATOMIC_ACQUIRE))
		cpu_relax();
}

int main(void)
{
	char path[256], up[64] = "?";
	unsigned long last_ops = ~0UL;
	double t0, seconds;
	pthread_t th;
	uint16_t cmd;
	int fd, err;

	mkdir("/proc", 0555);
	mkdir("/sys", 0555);
	mkdir("/dev", 0755);
	mount("proc", "/proc", "proc", 0, NULL);
	mount("sysfs", "/sys", "sysfs", 0, NULL);
	mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
	fd = open("/dev/console", O_RDWR);
	if (fd >= 0) {
		dup2(fd, STDOUT_FILENO);
		dup2(fd, STDERR_FILENO);
		if (fd > STDERR_FILENO)
			close(fd);
	}

	parse_cmdline();
	read_file("/proc/uptime", up, sizeof(up));
	*strchrnul(up, ' ') = 0;
	if (!opt.bdf[0] && !find_edu(opt.bdf, sizeof(opt.bdf)))
		skip("no %04x:%04x (edu) device in /sys/bus/pci/devices", EDU_VENDOR, EDU_DEVICE);

	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/config", opt.bdf);
	cfg_fd = open(path, O_RDWR);
	if (cfg_fd < 0)
		skip("%s: %s", path, strerror(errno));
	cmd = cmd_read();
	if (cmd == 0xffff || cmd_write(cmd | PCI_COMMAND_MEMORY))
		skip("cannot enable memory space in %s: %s", path, strerror(errno));
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/resource0", opt.bdf);
	fd = open(path, O_RDWR | O_SYNC);
	if (fd < 0)
		skip("%s: %s", path, strerror(errno));
	bar = mmap(NULL, BAR_MAP_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (bar == MAP_FAILED)
		skip("mmap %s: %s", path, strerror(errno));
	dev_id = bar[0];
	say("bar-race-guest: start uptime=%s bdf=%s command=0x%04x id=0x%08x mode=%s cycles=%lu "
	    "duration=%lu", up, opt.bdf, cmd_read(), dev_id, opt.control ? "control" : "race",
	    opt.cycles, opt.duration);
	if (dev_id == 0xffffffffu || dev_id == 0)
		skip("BAR0[0] reads 0x%08x with memory enabled", dev_id);
	if (dev_id != EDU_ID)
		say("bar-race-guest: note: the ID is 0x%08x, not edu's 0x%08x", dev_id, EDU_ID);

	err = pthread_create(&th, NULL, mmio_thread, NULL);
	if (err)
		skip("pthread_create: %s", strerror(err));
	t0 = now();
	for (;;) {
		unsigned long t = __atomic_load_n(&toggles, __ATOMIC_RELAXED);

		if (opt.duration ? now() - t0 >= opt.duration : t >= opt.cycles)
			break;
		if (opt.control)
			pause_mmio();
		cmd_write(cmd & ~PCI_COMMAND_MEMORY);
		sleep_ns(TOGGLE_SLEEP_NS);
		cmd_write(cmd | PCI_COMMAND_MEMORY);
		if (opt.control)
			resume_mmio();
		sleep_ns(TOGGLE_SLEEP_NS);
		__atomic_store_n(&toggles, ++t, __ATOMIC_RELAXED);
		if (opt.progress && !(t % opt.progress)) {
			unsigned long o = __atomic_load_n(&ops, __ATOMIC_RELAXED);

			say("bar-race-guest: toggles=%lu ops=%lu seconds=%.1f", t, o, now() - t0);
			/* No MMIO over a whole progress period: the race is over, say so. */
			if (o == last_ops) {
				say("bar-race-guest: the MMIO thread is stuck at ops=%lu (toggle %lu)",
				    o, t);
				finish("FAIL", now() - t0);
			}
			last_ops = o;
		}
	}
	__atomic_store_n(&stop, 1, __ATOMIC_RELEASE);
	seconds = now() - t0;
	/* Thread A stuck in an access (an L2 vCPU that stopped running) never sees stop. */
	for (int i = 0; i < 200 && !__atomic_load_n(&mmio_done, __ATOMIC_ACQUIRE); i++)
		sleep_ns(50000000L);
	if (!__atomic_load_n(&mmio_done, __ATOMIC_ACQUIRE)) {
		say("bar-race-guest: the MMIO thread is stuck at ops=%lu (10 s after the last toggle)",
		    __atomic_load_n(&ops, __ATOMIC_RELAXED));
		finish("FAIL", seconds);
	}
	pthread_join(th, NULL);
	if (other_reads)
		say("bar-race-guest: %lu reads were neither the ID nor all ones (first 0x%08x)",
		    other_reads, first_other);
	finish(other_reads ? "FAIL" : "PASS", seconds);
	return 0;
}
