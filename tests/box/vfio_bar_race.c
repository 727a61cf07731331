// SPDX-License-Identifier: GPL-2.0-only
/*
 * vfio_bar_race: the v1 field bug of "KVM: x86/mmu: Don't kill the VM on access to a disabled
 * passthrough BAR", reproduced with a real VFIO device, and the VMM policy that v2 enables.
 *
 * A tiny VMM (raw KVM and VFIO ioctls, libc and pthread only) maps BAR0 of a vfio-pci device
 * (by default QEMU's emulated `edu`, 1234:11e8) into a real-mode guest as a KVM memslot. One
 * vCPU loops on a 32-bit write to a BAR register and a 32-bit read of an identification
 * register, and checks every read: the device's real value or all ones, nothing else. A second
 * thread toggles PCI_COMMAND.MEM through the VFIO config region. vfio-pci zaps the BAR mapping
 * while memory is disabled and its fault handler refuses to map it again, so a guest access in
 * that window reaches kvm_handle_error_pfn() with a valid memslot.
 *
 *   base kernel:  KVM_RUN fails with EFAULT and a stale exit_reason. The VMM cannot tell this
 *                 from a real fault, so it dies, as QEMU does ("VM died").
 *   with the fix: KVM_RUN fails with EFAULT and exit_reason == KVM_EXIT_MEMORY_FAULT, gpa in the
 *                 BAR. While MEM is disabled the VMM emulates an Unsupported Request: it removes
 *                 the BAR memslot (as QEMU's memory listener would), so KVM exits with
 *                 KVM_EXIT_MMIO for BAR accesses: reads return all ones, writes are dropped.
 *                 When MEM comes back, the memslot is restored.
 *
 * Build: gcc -static -O2 -pthread -o vfio_bar_race vfio_bar_race.c
 * Run:   vfio_bar_race [--bdf 0000:00:03.0] [--cycles N | --duration S] [--bind]   (--help)
 *
 * Last line of output, machine-readable:
 *   vfio-bar-race: result=PASS|FAIL|SKIP|ERROR key=value ...
 * Exit status: 0 PASS, 1 FAIL, 2 setup error, 4 SKIP (kselftest's KSFT_SKIP), with the reason.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>
#include <linux/kvm.h>
#include <linux/pci_regs.h>
#include <linux/vfio.h>

#include "pci_sysfs.h"

/* Older uapi headers (Debian 12 ships 6.1) lack the memory-fault exit (Linux 6.8). */
#ifndef KVM_EXIT_MEMORY_FAULT
#define KVM_EXIT_MEMORY_FAULT 39
#endif
#ifndef KVM_CAP_MEMORY_FAULT_INFO
#define KVM_CAP_MEMORY_FAULT_INFO 232
#endif
/* run->memory_fault: a member of kvm_run's exit union, so it starts where run->mmio does. */
struct memfault_info {
	__u64 flags;
	__u64 gpa;
	__u64 size;
};
#define RUN_MEMFAULT(run) ((volatile struct memfault_info *)&(run)->mmio)

#define EXIT_PASS 0
#define EXIT_FAIL 1
#define EXIT_SETUP 2
#define EXIT_SKIP 4	/* KSFT_SKIP */


#define RAM_SLOT 0
#define BAR_SLOT 1
#define RAM_SIZE 0x10000
#define CODE_GPA 0x1000
#define PARAM_GPA 0x8000	/* +0 iterations, +4 expected, +8 write off, +c read off, +10 UR */
#define GUEST_ERR_PORT 0x10
#define GUEST_LOOP 0x1d		/* offset of the loop (label 1) in guest_code */

/*
 * The guest, 16-bit real mode, loaded at GPA 0x1000 (tests/box: assembled from this listing
 * with `as --32` .code16; es = RAM, ds = the BAR slot at GPA 0x20000 = segment 0x2000):
 *
 *   cli; xor ax,ax; mov es,ax; mov ax,0x2000; mov ds,ax
 *   mov si,[es:0x8008]          ; offset of the register to write (0xffff: none)
 *   mov di,[es:0x800c]          ; offset of the identification register
 *   mov ebp,[es:0x8004]         ; its real value
 *   xor ecx,ecx
 * 1: inc ecx
 *   cmp si,0xffff; je 2f
 *   mov [si],ecx                ; 32-bit MMIO write
 * 2: mov eax,[di]               ; 32-bit MMIO read
 *   cmp eax,ebp; je 4f          ; the real value
 *   cmp eax,0xffffffff; je 3f   ; all ones: Unsupported Request
 *   mov dx,0x10; out dx,eax     ; anything else: report it to the VMM
 *   jmp 4f
 * 3: inc dword [es:0x8010]      ; all ones seen
 * 4: inc dword [es:0x8000]      ; iterations
 *   jmp 1b
 */
static const unsigned char guest_code[] = {
	0xfa, 0x31, 0xc0, 0x8e, 0xc0, 0xb8, 0x00, 0x20, 0x8e, 0xd8, 0x26, 0x8b,
	0x36, 0x08, 0x80, 0x26, 0x8b, 0x3e, 0x0c, 0x80, 0x26, 0x66, 0x8b, 0x2e,
	0x04, 0x80, 0x66, 0x31, 0xc9, 0x66, 0x41, 0x83, 0xfe, 0xff, 0x74, 0x03,
	0x66, 0x89, 0x0c, 0x66, 0x8b, 0x05, 0x66, 0x39, 0xe8, 0x74, 0x13, 0x66,
	0x83, 0xf8, 0xff, 0x74, 0x07, 0xba, 0x10, 0x00, 0x66, 0xef, 0xeb, 0x06,
	0x26, 0x66, 0xff, 0x06, 0x10, 0x80, 0x26, 0x66, 0xff, 0x06, 0x00, 0x80,
	0xeb, 0xd3,
};

/* ---- options ---- */
static struct {
	char bdf[32];
	long cycles;		/* MEM off+on cycles; 0: until --duration */
	double duration;	/* seconds; 0: until --cycles */
	long period_us;		/* time MEM stays off, then on */
	uint64_t bar_gpa;	/* fixed: the guest's ds is segment 0x2000 */
	uint64_t slot_size;
	long ident_off;
	long long ident_val;	/* -1: read from the device at start */
	long write_off;		/* -1: no write (default for a device that is not edu) */
	int write_off_set;
	double hang_timeout;
	int bind;
	int restore_eager;	/* the toggler restores the slot while the vCPU runs */
	int stall_guest;	/* self-test of the hang watchdog: the guest spins, no progress */
	int verbose;
} opt = {
	.cycles = 0, .duration = 0, .period_us = 2000, .bar_gpa = 0x20000,
	.slot_size = 0x10000, .ident_off = 0, .ident_val = -1, .write_off = 4,
	.hang_timeout = 30, .bind = 0, .verbose = 0,
};

/* ---- state ---- */
static int kvm_fd = -1, vm_fd = -1, vcpu_fd = -1;
static int container_fd = -1, group_fd = -1, dev_fd = -1;
static struct kvm_run *run;
static unsigned char *ram;
static void *bar;
static uint64_t bar_region_off, bar_region_size, cfg_region_off;
static uint16_t cmd_base;		/* PCI_COMMAND with MEM set */
static const char *iommu_name = "?";
static char group_path[64];
static char mmu_name[32] = "?";
static pthread_t vcpu_thread, toggle_thread;
static volatile pid_t vcpu_tid, toggle_tid;

/* The device's memory-space state and the BAR memslot, as the VMM sees them. */
static pthread_mutex_t lk = PTHREAD_MUTEX_INITIALIZER;
static int mem_enabled = 1;
static int slot_present = 1;
static int hit_this_cycle;

/* Counters (written by one thread each, read by the watchdog). */
static volatile long cycles_done, hit_cycles;
static volatile long memfault_exits, memfault_retries, ur_mmio, ur_reads, ur_writes;
static volatile long ur_with_slot;	/* KVM_EXIT_MMIO in the BAR while its memslot exists */
static volatile long fwd_mmio, slot_removals, slot_restores, kvm_exits, eintr_exits;
static volatile long deaths, guest_errors, hangs;
static volatile uint32_t first_bad_value;
static char death_reason[256];
static char fail_token[32];

static volatile int stop_req, vcpu_done, toggle_done, in_kvm_run, kick_for_diag;

static double t_start;

static void say(const char *fmt, ...)
{
	va_list ap;

	fputs("vfio-bar-race: ", stdout);
	va_start(ap, fmt);
	vfprintf(stdout, fmt, ap);
	va_end(ap);
	fputc('\n', stdout);
	fflush(stdout);
}

static void summary_kv(const char *result, const char *reason)
{
	printf("vfio-bar-race: result=%s", result);
	if (reason)
		printf(strchr(reason, ' ') ? " reason=\"%s\"" : " reason=%s", reason);
	fflush(stdout);
}

static void __attribute__((noreturn, format(printf, 2, 3))) bail(int code, const char *fmt, ...)
{
	char msg[512];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	say("%s: %s", code == EXIT_SKIP ? "SKIP" : "setup error", msg);
	for (char *p = msg; *p; p++)
		if (*p == '"')
			*p = '\'';
	summary_kv(code == EXIT_SKIP ? "SKIP" : "ERROR", msg);
	printf("\n");
	exit(code);
}

/* ---- sysfs helpers ---- */
static int write_file(const char *path, const char *s)
{
	int fd = open(path, O_WRONLY);
	ssize_t n;

	if (fd < 0)
		return -1;
	n = write(fd, s, strlen(s));
	close(fd);
	return n == (ssize_t)strlen(s) ? 0 : -1;
}

static int link_basename(const char *path, char *out, size_t len)
{
	char buf[PATH_MAX];
	ssize_t n = readlink(path, buf, sizeof(buf) - 1);
	const char *b;

	if (n < 0)
		return -1;
	buf[n] = 0;
	b = strrchr(buf, '/');
	snprintf(out, len, "%s", b ? b + 1 : buf);
	return 0;
}

static void detect_mmu(void)
{
	char param[8] = "", tdp[8] = "", buf[8192] = "";
	int svm, vmx;

	/* Both vendor modules may be built in: the CPU decides which one runs. */
	read_file("/proc/cpuinfo", buf, sizeof(buf));
	svm = strstr(buf, " svm") != NULL;
	vmx = strstr(buf, " vmx") != NULL;
	if (svm)
		read_file("/sys/module/kvm_amd/parameters/npt", param, sizeof(param));
	else if (vmx)
		read_file("/sys/module/kvm_intel/parameters/ept", param, sizeof(param));
	read_file("/sys/module/kvm/parameters/tdp_mmu", tdp, sizeof(tdp));
	if (param[0] == 'Y' || param[0] == '1')
		snprintf(mmu_name, sizeof(mmu_name), "%s", tdp[0] == 'Y' ? "tdp_mmu" : "tdp");
	else if (param[0])
		snprintf(mmu_name, sizeof(mmu_name), "shadow");
}

/* ---- VFIO ---- */
static uint16_t cfg_read16(unsigned int off)
{
	uint16_t v;

	if (pread(dev_fd, &v, 2, cfg_region_off + off) != 2)
		return 0xffff;
	return v;
}

static int cfg_write16(unsigned int off, uint16_t v)
{
	return pwrite(dev_fd, &v, 2, cfg_region_off + off) == 2 ? 0 : -1;
}

static void bind_vfio_pci(const char *bdf)
{
	char path[256], drv[64] = "";

	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/driver", bdf);
	if (!link_basename(path, drv, sizeof(drv)) && !strcmp(drv, "vfio-pci"))
		return;
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/driver_override", bdf);
	if (write_file(path, "vfio-pci"))
		bail(EXIT_SETUP, "cannot write %s: %s", path, strerror(errno));
	if (drv[0]) {
		snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/driver/unbind", bdf);
		write_file(path, bdf);
	}
	write_file("/sys/bus/pci/drivers_probe", bdf);
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/driver", bdf);
	if (link_basename(path, drv, sizeof(drv)) || strcmp(drv, "vfio-pci"))
		bail(EXIT_SKIP, "%s did not bind to vfio-pci (CONFIG_VFIO_PCI? an IOMMU or "
		     "vfio.enable_unsafe_noiommu_mode=1?)", bdf);
	say("bound %s to vfio-pci", bdf);
}

static void setup_vfio(void)
{
	char path[256], grp[32], drv[64] = "", noiommu[8] = "";
	struct vfio_group_status gs = { .argsz = sizeof(gs) };
	struct vfio_device_info di = { .argsz = sizeof(di) };
	struct vfio_region_info ri = { .argsz = sizeof(ri) };
	unsigned long iommu_type;
	int is_noiommu;

	if (!strcmp(opt.bdf, "auto"))
		opt.bdf[0] = 0;
	if (!opt.bdf[0] && !find_edu(opt.bdf, sizeof(opt.bdf)))
		bail(EXIT_SKIP, "no --bdf given and no %04x:%04x (QEMU edu) device in "
		     "/sys/bus/pci/devices", EDU_VENDOR, EDU_DEVICE);
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s", opt.bdf);
	if (access(path, F_OK))
		bail(EXIT_SKIP, "no PCI device %s", opt.bdf);
	if (!opt.write_off_set && !(sysfs_hex(opt.bdf, "vendor") == EDU_VENDOR &&
				    sysfs_hex(opt.bdf, "device") == EDU_DEVICE))
		opt.write_off = -1;	/* never write to an unknown device's registers */
	if (opt.bind)
		bind_vfio_pci(opt.bdf);
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/driver", opt.bdf);
	link_basename(path, drv, sizeof(drv));
	if (strcmp(drv, "vfio-pci"))
		bail(EXIT_SKIP, "%s is bound to '%s', not vfio-pci (use --bind, or driver_override "
		     "+ drivers_probe)", opt.bdf, drv[0] ? drv : "no driver");
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/iommu_group", opt.bdf);
	if (link_basename(path, grp, sizeof(grp)))
		bail(EXIT_SKIP, "%s has no iommu_group (no IOMMU and noiommu mode off)", opt.bdf);

	read_file("/sys/module/vfio/parameters/enable_unsafe_noiommu_mode", noiommu,
		  sizeof(noiommu));
	snprintf(group_path, sizeof(group_path), "/dev/vfio/noiommu-%s", grp);
	is_noiommu = (noiommu[0] == 'Y' || noiommu[0] == '1') && !access(group_path, F_OK);
	if (!is_noiommu) {
		snprintf(group_path, sizeof(group_path), "/dev/vfio/%s", grp);
		if (access(group_path, F_OK))
			bail(EXIT_SKIP, "neither /dev/vfio/noiommu-%s nor /dev/vfio/%s exists "
			     "(enable_unsafe_noiommu_mode=%s)", grp, grp, noiommu[0] ? noiommu : "?");
	}
	iommu_type = is_noiommu ? VFIO_NOIOMMU_IOMMU : VFIO_TYPE1v2_IOMMU;
	iommu_name = is_noiommu ? "noiommu" : "type1v2";

	container_fd = open("/dev/vfio/vfio", O_RDWR);
	if (container_fd < 0)
		bail(EXIT_SKIP, "/dev/vfio/vfio: %s (CONFIG_VFIO_CONTAINER?)", strerror(errno));
	if (ioctl(container_fd, VFIO_GET_API_VERSION) != VFIO_API_VERSION)
		bail(EXIT_SETUP, "VFIO API version mismatch");
	if (ioctl(container_fd, VFIO_CHECK_EXTENSION, iommu_type) <= 0)
		bail(EXIT_SKIP, "the VFIO container does not support the %s IOMMU type", iommu_name);
	group_fd = open(group_path, O_RDWR);
	if (group_fd < 0)
		bail(errno == ENOENT ? EXIT_SKIP : EXIT_SETUP, "%s: %s", group_path, strerror(errno));
	if (ioctl(group_fd, VFIO_GROUP_GET_STATUS, &gs))
		bail(EXIT_SETUP, "VFIO_GROUP_GET_STATUS: %s", strerror(errno));
	if (!(gs.flags & VFIO_GROUP_FLAGS_VIABLE))
		bail(EXIT_SKIP, "group %s is not viable: bind every device in it to vfio-pci",
		     group_path);
	if (ioctl(group_fd, VFIO_GROUP_SET_CONTAINER, &container_fd))
		bail(EXIT_SETUP, "VFIO_GROUP_SET_CONTAINER: %s", strerror(errno));
	if (ioctl(container_fd, VFIO_SET_IOMMU, iommu_type))
		bail(EXIT_SETUP, "VFIO_SET_IOMMU(%s): %s", iommu_name, strerror(errno));
	dev_fd = ioctl(group_fd, VFIO_GROUP_GET_DEVICE_FD, opt.bdf);
	if (dev_fd < 0)
		bail(EXIT_SETUP, "VFIO_GROUP_GET_DEVICE_FD(%s): %s", opt.bdf, strerror(errno));
	if (ioctl(dev_fd, VFIO_DEVICE_GET_INFO, &di) || !(di.flags & VFIO_DEVICE_FLAGS_PCI))
		bail(EXIT_SETUP, "VFIO_DEVICE_GET_INFO: not a PCI device");

	ri.index = VFIO_PCI_CONFIG_REGION_INDEX;
	if (ioctl(dev_fd, VFIO_DEVICE_GET_REGION_INFO, &ri))
		bail(EXIT_SETUP, "config region info: %s", strerror(errno));
	cfg_region_off = ri.offset;

	memset(&ri, 0, sizeof(ri));
	ri.argsz = sizeof(ri);
	ri.index = VFIO_PCI_BAR0_REGION_INDEX;
	if (ioctl(dev_fd, VFIO_DEVICE_GET_REGION_INFO, &ri))
		bail(EXIT_SETUP, "BAR0 region info: %s", strerror(errno));
	bar_region_off = ri.offset;
	bar_region_size = ri.size;
	if (!(ri.flags & VFIO_REGION_INFO_FLAG_MMAP) || !(ri.flags & VFIO_REGION_INFO_FLAG_READ))
		bail(EXIT_SKIP, "BAR0 of %s is not mmappable (flags 0x%x, size 0x%llx)", opt.bdf,
		     ri.flags, (unsigned long long)ri.size);
	if (opt.slot_size > bar_region_size)
		opt.slot_size = bar_region_size & ~0xfffULL;
	if (opt.slot_size < 0x1000 || opt.ident_off + 4 > (long)opt.slot_size ||
	    opt.write_off + 4 > (long)opt.slot_size)
		bail(EXIT_SETUP, "BAR0 too small (0x%llx) for the slot and the registers",
		     (unsigned long long)bar_region_size);

	cmd_base = cfg_read16(PCI_COMMAND);
	if (cmd_base == 0xffff)
		bail(EXIT_SETUP, "cannot read PCI_COMMAND through the config region");
	if (!(cmd_base & PCI_COMMAND_MEMORY)) {
		cmd_base |= PCI_COMMAND_MEMORY;
		if (cfg_write16(PCI_COMMAND, cmd_base))
			bail(EXIT_SETUP, "cannot enable PCI_COMMAND.MEM: %s", strerror(errno));
	}

	bar = mmap(NULL, opt.slot_size, PROT_READ | PROT_WRITE, MAP_SHARED, dev_fd, bar_region_off);
	if (bar == MAP_FAILED)
		bail(EXIT_SETUP, "mmap BAR0: %s", strerror(errno));
	if (opt.ident_val < 0)
		opt.ident_val = *(volatile uint32_t *)((char *)bar + opt.ident_off);
	if (opt.ident_val == 0xffffffffLL)
		bail(EXIT_SETUP, "the identification register reads all ones with MEM enabled");
	say("device %s %04lx:%04lx group %s iommu %s BAR0 size 0x%llx flags 0x%x command 0x%04x "
	    "ident[0x%lx]=0x%08llx", opt.bdf, sysfs_hex(opt.bdf, "vendor"),
	    sysfs_hex(opt.bdf, "device"), group_path, iommu_name,
	    (unsigned long long)bar_region_size, ri.flags, cmd_base, opt.ident_off,
	    (unsigned long long)opt.ident_val);
}

/* ---- KVM ---- */
static int set_bar_slot(int present)
{
	struct kvm_userspace_memory_region r = {
		.slot = BAR_SLOT,
		.guest_phys_addr = opt.bar_gpa,
		.memory_size = present ? opt.slot_size : 0,
		.userspace_addr = (uintptr_t)bar,
	};

	return ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION, &r);
}

static void open_kvm(void)
{
	kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm_fd < 0)
		bail(EXIT_SKIP, "/dev/kvm: %s", strerror(errno));
	if (ioctl(kvm_fd, KVM_GET_API_VERSION, 0) != KVM_API_VERSION)
		bail(EXIT_SKIP, "KVM API version mismatch");
	detect_mmu();
}

static void setup_vm(void)
{
	struct kvm_userspace_memory_region r = { 0 };
	struct kvm_sregs sregs;
	struct kvm_regs regs;
	int mmap_size, cap;

	do
		vm_fd = ioctl(kvm_fd, KVM_CREATE_VM, 0);
	while (vm_fd < 0 && errno == EINTR);
	if (vm_fd < 0)
		bail(EXIT_SETUP, "KVM_CREATE_VM: %s", strerror(errno));
	cap = ioctl(vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_MEMORY_FAULT_INFO);
	ioctl(vm_fd, KVM_SET_TSS_ADDR, 0xfffbd000UL);	/* VMX real mode; harmless on SVM */

	ram = mmap(NULL, RAM_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (ram == MAP_FAILED)
		bail(EXIT_SETUP, "mmap RAM: %s", strerror(errno));
	memcpy(ram + CODE_GPA, guest_code, sizeof(guest_code));
	if (opt.stall_guest)
		memcpy(ram + CODE_GPA + GUEST_LOOP, "\xeb\xfe", 2);	/* 1: jmp 1b */
	*(uint32_t *)(ram + PARAM_GPA + 0x4) = (uint32_t)opt.ident_val;
	*(uint16_t *)(ram + PARAM_GPA + 0x8) = opt.write_off < 0 ? 0xffff : (uint16_t)opt.write_off;
	*(uint16_t *)(ram + PARAM_GPA + 0xc) = (uint16_t)opt.ident_off;
	r.slot = RAM_SLOT;
	r.memory_size = RAM_SIZE;
	r.userspace_addr = (uintptr_t)ram;
	if (ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION, &r))
		bail(EXIT_SETUP, "RAM memslot: %s", strerror(errno));
	if (set_bar_slot(1))
		bail(EXIT_SETUP, "BAR memslot at 0x%llx: %s", (unsigned long long)opt.bar_gpa,
		     strerror(errno));

	vcpu_fd = ioctl(vm_fd, KVM_CREATE_VCPU, 0);
	if (vcpu_fd < 0)
		bail(EXIT_SETUP, "KVM_CREATE_VCPU: %s", strerror(errno));
	mmap_size = ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
	run = mmap(NULL, mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu_fd, 0);
	if (run == MAP_FAILED)
		bail(EXIT_SETUP, "mmap kvm_run: %s", strerror(errno));
	if (ioctl(vcpu_fd, KVM_GET_SREGS, &sregs))
		bail(EXIT_SETUP, "KVM_GET_SREGS: %s", strerror(errno));
	sregs.cs.base = 0;
	sregs.cs.selector = 0;
	sregs.ds = sregs.es = sregs.ss = sregs.fs = sregs.gs = sregs.cs;
	sregs.ds.type = sregs.es.type = sregs.ss.type = sregs.fs.type = sregs.gs.type = 3;
	if (ioctl(vcpu_fd, KVM_SET_SREGS, &sregs))
		bail(EXIT_SETUP, "KVM_SET_SREGS: %s", strerror(errno));
	memset(&regs, 0, sizeof(regs));
	regs.rip = CODE_GPA;
	regs.rflags = 2;
	if (ioctl(vcpu_fd, KVM_SET_REGS, &regs))
		bail(EXIT_SETUP, "KVM_SET_REGS: %s", strerror(errno));
	say("KVM: vm ready, KVM_CAP_MEMORY_FAULT_INFO=%d, mmu=%s, BAR slot 0x%llx+0x%llx",
	    cap, mmu_name, (unsigned long long)opt.bar_gpa, (unsigned long long)opt.slot_size);
}

static void dump_vcpu(const char *why)
{
	struct kvm_regs regs;
	struct kvm_sregs sregs;

	if (ioctl(vcpu_fd, KVM_GET_REGS, &regs) || ioctl(vcpu_fd, KVM_GET_SREGS, &sregs)) {
		say("%s: cannot read vCPU registers: %s", why, strerror(errno));
		return;
	}
	say("%s: rip=0x%llx cs=0x%x(base 0x%llx) ds=0x%x rax=0x%llx rcx=0x%llx rsi=0x%llx "
	    "rdi=0x%llx rflags=0x%llx guest_iters=%u", why, regs.rip, sregs.cs.selector,
	    sregs.cs.base, sregs.ds.selector, regs.rax, regs.rcx, regs.rsi, regs.rdi, regs.rflags,
	    *(volatile uint32_t *)(ram + PARAM_GPA));
}

/* ---- the vCPU: KVM_RUN and the VMM's policy ---- */
static void on_kick(int sig)
{
	(void)sig;
	if (run)
		run->immediate_exit = 1;
}

static void vm_died(int err, const char *fmt, ...)
{
	va_list ap;
	uint16_t cmd;
	int n, mem, slot;

	pthread_mutex_lock(&lk);	/* the toggler may be between its config write and the flag */
	cmd = cfg_read16(PCI_COMMAND);
	mem = mem_enabled;
	slot = slot_present;
	pthread_mutex_unlock(&lk);
	n = snprintf(death_reason, sizeof(death_reason), "KVM_RUN: %s (errno %d), ",
		     err ? strerror(err) : "no error", err);
	va_start(ap, fmt);
	vsnprintf(death_reason + n, sizeof(death_reason) - n, fmt, ap);
	va_end(ap);
	deaths++;
	say("VM died: %s; MEM=%s (PCI_COMMAND 0x%04x) slot=%s cycle=%ld (QEMU prints 'error: kvm "
	    "run failed %s' and stops the VM here)", death_reason, mem ? "on" : "off", cmd,
	    slot ? "present" : "removed", cycles_done, err ? strerror(err) : "?");
	dump_vcpu("VM died");
}

static int in_bar(uint64_t gpa)
{
	return gpa >= opt.bar_gpa && gpa < opt.bar_gpa + opt.slot_size;
}

static void *vcpu_main(void *arg)
{
	long consecutive_retries = 0;

	(void)arg;
	vcpu_tid = syscall(SYS_gettid);
	for (;;) {
		int r, err;

		if (stop_req)
			break;
		run->exit_reason = KVM_EXIT_UNKNOWN;	/* poison: only this KVM_RUN can set 39 */
		in_kvm_run = 1;
		r = ioctl(vcpu_fd, KVM_RUN, 0);
		err = errno;
		in_kvm_run = 0;
		kvm_exits++;
		if (r < 0) {
			if (err == EINTR || err == EAGAIN) {
				eintr_exits++;
				run->immediate_exit = 0;
				if (kick_for_diag) {
					dump_vcpu("HANG: KVM_RUN returned to a signal");
					kick_for_diag = 0;
					break;
				}
				continue;
			}
			if (err == EFAULT && run->exit_reason == KVM_EXIT_MEMORY_FAULT) {
				volatile struct memfault_info *mf = RUN_MEMFAULT(run);
				uint64_t gpa = mf->gpa;

				memfault_exits++;
				if (!in_bar(gpa)) {
					vm_died(err, "KVM_EXIT_MEMORY_FAULT outside the BAR, gpa=0x%llx",
						(unsigned long long)gpa);
					snprintf(fail_token, sizeof(fail_token), "memfault-outside-bar");
					break;
				}
				pthread_mutex_lock(&lk);
				if (opt.verbose > 1 || memfault_exits == 1)
					say("KVM_EXIT_MEMORY_FAULT gpa=0x%llx size=0x%llx flags=0x%llx "
					    "MEM=%s", (unsigned long long)gpa,
					    (unsigned long long)mf->size, (unsigned long long)mf->flags,
					    mem_enabled ? "on" : "off");
				if (!mem_enabled) {
					/* Unsupported Request: drop the slot, emulate as MMIO. */
					if (slot_present) {
						if (set_bar_slot(0))
							say("removing the BAR memslot: %s", strerror(errno));
						else
							slot_removals++;
						slot_present = 0;
					}
					hit_this_cycle = 1;
					consecutive_retries = 0;
				} else {
					/* MEM came back after the fault: vfio maps it again. */
					memfault_retries++;
					consecutive_retries++;
				}
				pthread_mutex_unlock(&lk);
				if (consecutive_retries > 1000) {
					vm_died(err, "KVM_EXIT_MEMORY_FAULT at gpa 0x%llx 1000 times in a "
						"row with MEM enabled", (unsigned long long)gpa);
					snprintf(fail_token, sizeof(fail_token), "memfault-livelock");
					break;
				}
				continue;
			}
			vm_died(err, "exit_reason=%u (stale: not KVM_EXIT_MEMORY_FAULT)",
				run->exit_reason);
			snprintf(fail_token, sizeof(fail_token), "vm-died-%s",
				 err == EFAULT ? "efault" : err == EIO ? "eio" : "errno");
			break;
		}
		consecutive_retries = 0;
		switch (run->exit_reason) {
		case KVM_EXIT_MMIO: {
			uint64_t gpa = run->mmio.phys_addr;
			uint32_t len = run->mmio.len;

			if (!in_bar(gpa) || len > 8) {
				vm_died(0, "KVM_EXIT_MMIO outside the BAR: gpa=0x%llx len=%u",
					(unsigned long long)gpa, len);
				snprintf(fail_token, sizeof(fail_token), "mmio-outside-bar");
				goto out;
			}
			pthread_mutex_lock(&lk);
			if (mem_enabled) {
				/*
				 * MEM is back: the access reaches the device through the
				 * region (the slow path, with the guest's access width), and
				 * the BAR is mapped into the guest again.
				 */
				off_t off = bar_region_off + (gpa - opt.bar_gpa);
				ssize_t n = run->mmio.is_write ?
					pwrite(dev_fd, run->mmio.data, len, off) :
					pread(dev_fd, run->mmio.data, len, off);
				if (n != (ssize_t)len && !run->mmio.is_write)
					memset(run->mmio.data, 0xff, len);
				fwd_mmio++;
				if (!slot_present) {
					if (set_bar_slot(1))
						say("restoring the BAR memslot: %s", strerror(errno));
					else
						slot_restores++;
					slot_present = 1;
				}
			} else {
				if (run->mmio.is_write) {
					ur_writes++;
				} else {
					memset(run->mmio.data, 0xff, len);
					ur_reads++;
				}
				ur_mmio++;
				ur_with_slot += slot_present;
				hit_this_cycle = 1;
			}
			pthread_mutex_unlock(&lk);
			break;
		}
		case KVM_EXIT_IO:
			if (run->io.port == GUEST_ERR_PORT && run->io.direction == KVM_EXIT_IO_OUT) {
				uint32_t v = *(uint32_t *)((char *)run + run->io.data_offset);

				if (!guest_errors)
					first_bad_value = v;
				guest_errors++;
				if (guest_errors <= 10)
					say("guest check failed: read 0x%08x, expected 0x%08llx or "
					    "0xffffffff (MEM=%s, cycle %ld)", v,
					    (unsigned long long)opt.ident_val,
					    mem_enabled ? "on" : "off", cycles_done);
				break;
			}
			vm_died(0, "unexpected I/O exit port 0x%x", run->io.port);
			snprintf(fail_token, sizeof(fail_token), "unexpected-io");
			goto out;
		case KVM_EXIT_INTR:
			break;
		case KVM_EXIT_INTERNAL_ERROR:
			vm_died(0, "KVM_EXIT_INTERNAL_ERROR suberror %u", run->internal.suberror);
			snprintf(fail_token, sizeof(fail_token), "internal-error");
			goto out;
		default:
			vm_died(0, "unexpected exit_reason %u", run->exit_reason);
			snprintf(fail_token, sizeof(fail_token), "unexpected-exit");
			goto out;
		}
	}
out:
	vcpu_done = 1;
	return NULL;
}

/* ---- the toggler: PCI_COMMAND.MEM through the VFIO config region ---- */
static void sleep_us(long us)
{
	struct timespec ts = { us / 1000000, (us % 1000000) * 1000 };

	while (nanosleep(&ts, &ts) && errno == EINTR)
		;
}

static uint32_t guest_iters(void)
{
	return *(volatile uint32_t *)(ram + PARAM_GPA);
}

/* Wait up to max_us for cond (polled every 200 us); the period is a minimum, not a maximum. */
#define WAIT_FOR(cond, max_us) do {						\
		for (long _w = 0; !(cond) && _w < (max_us) && !stop_req && !vcpu_done; \
		     _w += 200)							\
			sleep_us(200);						\
	} while (0)

static void *toggle_main(void *arg)
{
	double deadline = opt.duration > 0 ? t_start + opt.duration : 0;
	uint32_t iters;

	(void)arg;
	toggle_tid = syscall(SYS_gettid);
	/* Let the guest reach the device through the mapping first (the watchdog sees a hang). */
	WAIT_FOR(guest_iters() > 0, 1000000L * 3600);
	while (!stop_req && !vcpu_done) {
		if (opt.cycles && cycles_done >= opt.cycles)
			break;
		if (deadline && now() >= deadline)
			break;
		pthread_mutex_lock(&lk);
		if (cfg_write16(PCI_COMMAND, cmd_base & ~PCI_COMMAND_MEMORY))
			say("clearing PCI_COMMAND.MEM: %s", strerror(errno));
		mem_enabled = 0;
		hit_this_cycle = 0;
		pthread_mutex_unlock(&lk);

		sleep_us(opt.period_us);
		WAIT_FOR(hit_this_cycle, 200000);	/* a slow box: give the vCPU its chance */

		pthread_mutex_lock(&lk);
		if (cfg_write16(PCI_COMMAND, cmd_base))
			say("setting PCI_COMMAND.MEM: %s", strerror(errno));
		mem_enabled = 1;
		if (opt.restore_eager && !slot_present) {
			if (set_bar_slot(1))
				say("restoring the BAR memslot: %s", strerror(errno));
			else
				slot_restores++;
			slot_present = 1;
		}
		if (hit_this_cycle)
			hit_cycles++;
		cycles_done++;
		iters = guest_iters();
		pthread_mutex_unlock(&lk);

		if (opt.verbose && cycles_done % 100 == 0)
			say("progress: cycles=%ld memfault_exits=%ld ur_mmio=%ld guest_iters=%u",
			    cycles_done, memfault_exits, ur_mmio,
			    guest_iters());
		sleep_us(opt.period_us);
		/* The guest reaches the device again (and, with --restore vcpu, the slot is back). */
		WAIT_FOR(slot_present && guest_iters() != iters, 200000);
	}
	toggle_done = 1;
	return NULL;
}

/* ---- the watchdog (main thread) ---- */
static void print_task(const char *name, pid_t tid)
{
	char path[128], buf[4096];

	if (!tid)
		return;
	snprintf(path, sizeof(path), "/proc/self/task/%d/stat", tid);
	if (!read_file(path, buf, sizeof(buf))) {
		char *p = strrchr(buf, ')');

		say("HANG: %s thread %d state %c", name, tid, p && p[1] ? p[2] : '?');
	}
	snprintf(path, sizeof(path), "/proc/self/task/%d/wchan", tid);
	if (!read_file(path, buf, sizeof(buf)))
		say("HANG: %s thread wchan %s", name, buf);
	snprintf(path, sizeof(path), "/proc/self/task/%d/stack", tid);
	if (!read_file(path, buf, sizeof(buf)))
		printf("vfio-bar-race: HANG: %s thread kernel stack:\n%s\n", name, buf);
	fflush(stdout);
}

static int watchdog(void)
{
	uint64_t last = ~0ULL;
	double last_change = now(), stop_at = 0;

	for (;;) {
		uint64_t progress = *(volatile uint32_t *)(ram + PARAM_GPA) + kvm_exits;
		double t = now();

		if (vcpu_done)
			return 0;
		if (toggle_done && !stop_req) {
			stop_req = 1;
			stop_at = t;
		}
		if (stop_req) {
			pthread_kill(vcpu_thread, SIGUSR1);
			if (t - stop_at > 10) {
				say("HANG: the vCPU does not leave KVM_RUN after a signal (10 s)");
				print_task("vCPU", vcpu_tid);
				return -1;
			}
		} else if (progress != last) {
			last = progress;
			last_change = t;
		} else if (t - last_change > opt.hang_timeout) {
			hangs++;
			say("HANG: no progress for %.0f s: guest_iters=%u kvm_exits=%ld in_kvm_run=%d "
			    "MEM=%s slot=%s cycles=%ld", opt.hang_timeout,
			    *(volatile uint32_t *)(ram + PARAM_GPA), kvm_exits, in_kvm_run,
			    mem_enabled ? "on" : "off", slot_present ? "present" : "removed",
			    cycles_done);
			print_task("vCPU", vcpu_tid);
			print_task("toggler", toggle_tid);
			write_file("/proc/sysrq-trigger", "t");	/* every task, with kernel stacks */
			kick_for_diag = 1;
			stop_req = 1;
			stop_at = t;
			snprintf(fail_token, sizeof(fail_token), "hang");
		}
		usleep(50000);
	}
}

static void usage(FILE *f)
{
	fprintf(f,
"usage: vfio_bar_race [options]\n"
"  --bdf DDDD:BB:DD.F   the vfio-pci device (default, or 'auto': the first 1234:11e8 QEMU\n"
"                       edu device)\n"
"  --bind               bind the device to vfio-pci first (driver_override + drivers_probe)\n"
"  --cycles N           PCI_COMMAND.MEM off/on cycles (default 200 without --duration)\n"
"  --duration S         toggle for S seconds (with --cycles: whichever ends first)\n"
"  --period-us US       MEM stays off US, then on US (default 2000)\n"
"  --slot-size BYTES    how much of BAR0 becomes the memslot (default 0x10000)\n"
"  --ident-offset OFF   register the guest reads and checks (default 0)\n"
"  --ident-value V      its real value (default: read from the device at start)\n"
"  --write-offset OFF   register the guest writes, -1: none (default 4 on edu, else none)\n"
"  --restore WHO       who maps the BAR again when MEM is back: 'vcpu' (default: the vCPU\n"
"                       thread, on its next BAR exit, outside KVM_RUN) or 'toggler' (at once,\n"
"                       while the vCPU runs, as QEMU's memory listener on another thread)\n"
"  --hang-timeout S     no guest progress for S seconds is a hang (default 30)\n"
"  --stall-guest        self-test of the hang watchdog: the guest spins without progress\n"
"  -v                   progress lines; -v -v: every memory-fault exit\n"
"exit: 0 PASS, 1 FAIL, 2 setup error, 4 SKIP\n");
}

static void parse_args(int argc, char **argv)
{
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		const char *v = i + 1 < argc ? argv[i + 1] : NULL;
		int takes = 1;

		if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
			usage(stdout);
			exit(0);
		} else if (!strcmp(a, "-v")) {
			opt.verbose++;
			takes = 0;
		} else if (!strcmp(a, "--bind")) {
			opt.bind = 1;
			takes = 0;
		} else if (!strcmp(a, "--stall-guest")) {
			opt.stall_guest = 1;
			takes = 0;
		} else if (!v) {
			usage(stderr);
			bail(EXIT_SETUP, "option %s needs a value", a);
		} else if (!strcmp(a, "--bdf")) {
			snprintf(opt.bdf, sizeof(opt.bdf), "%s", v);
		} else if (!strcmp(a, "--cycles")) {
			opt.cycles = strtol(v, NULL, 0);
		} else if (!strcmp(a, "--duration")) {
			opt.duration = strtod(v, NULL);
		} else if (!strcmp(a, "--period-us")) {
			opt.period_us = strtol(v, NULL, 0);
		} else if (!strcmp(a, "--slot-size")) {
			opt.slot_size = strtoull(v, NULL, 0) & ~0xfffULL;
		} else if (!strcmp(a, "--ident-offset")) {
			opt.ident_off = strtol(v, NULL, 0) & ~3L;
		} else if (!strcmp(a, "--ident-value")) {
			opt.ident_val = strtoll(v, NULL, 0) & 0xffffffffLL;
		} else if (!strcmp(a, "--write-offset")) {
			opt.write_off = strtol(v, NULL, 0);
			if (opt.write_off >= 0)
				opt.write_off &= ~3L;
			opt.write_off_set = 1;
		} else if (!strcmp(a, "--restore")) {
			if (strcmp(v, "vcpu") && strcmp(v, "toggler"))
				bail(EXIT_SETUP, "--restore: 'vcpu' or 'toggler'");
			opt.restore_eager = !strcmp(v, "toggler");
		} else if (!strcmp(a, "--hang-timeout")) {
			opt.hang_timeout = strtod(v, NULL);
		} else {
			usage(stderr);
			bail(EXIT_SETUP, "unknown option %s", a);
		}
		i += takes;
	}
	if (!opt.cycles && opt.duration <= 0)
		opt.cycles = 200;
	if (opt.slot_size > 0x10000)
		opt.slot_size = 0x10000;	/* what a real-mode segment reaches */
	if (opt.period_us < 100)
		opt.period_us = 100;
}

int main(int argc, char **argv)
{
	struct sigaction sa = { .sa_handler = on_kick };	/* no SA_RESTART: KVM_RUN -> EINTR */
	struct utsname u;
	const char *result;
	double secs;
	int wd, code;

	setvbuf(stdout, NULL, _IOLBF, 0);
	parse_args(argc, argv);
	uname(&u);
	say("start: kernel %s %s, cycles=%ld duration=%.1f period_us=%ld restore=%s", u.release,
	    u.version, opt.cycles, opt.duration, opt.period_us,
	    opt.restore_eager ? "toggler" : "vcpu");
	open_kvm();
	setup_vfio();
	setup_vm();
	sigemptyset(&sa.sa_mask);
	sigaction(SIGUSR1, &sa, NULL);

	t_start = now();
	if (pthread_create(&vcpu_thread, NULL, vcpu_main, NULL) ||
	    pthread_create(&toggle_thread, NULL, toggle_main, NULL))
		bail(EXIT_SETUP, "pthread_create failed");
	wd = watchdog();
	secs = now() - t_start;
	if (!wd) {
		pthread_join(vcpu_thread, NULL);
		stop_req = 1;
		pthread_join(toggle_thread, NULL);
	} else {
		hangs += !hangs;
		if (!fail_token[0])
			snprintf(fail_token, sizeof(fail_token), "hang");
	}

	if (!fail_token[0]) {
		if (guest_errors)
			snprintf(fail_token, sizeof(fail_token), "guest-error");
		else if (opt.cycles && cycles_done < opt.cycles)
			snprintf(fail_token, sizeof(fail_token), "short");
		else if (!memfault_exits && !ur_mmio)
			snprintf(fail_token, sizeof(fail_token), "race-not-hit");
	}
	result = fail_token[0] ? "FAIL" : "PASS";
	code = fail_token[0] ? EXIT_FAIL : EXIT_PASS;
	if (deaths)
		say("the VMM could not tell the disabled BAR from a real fault: the VM is dead");
	if (guest_errors)
		say("guest saw %ld bad reads, first 0x%08x", guest_errors, first_bad_value);
	summary_kv(result, fail_token[0] ? fail_token : NULL);
	printf(" cycles=%ld hit_cycles=%ld memfault_exits=%ld memfault_retries=%ld ur_mmio=%ld "
	       "ur_reads=%ld ur_writes=%ld ur_with_slot=%ld fwd_mmio=%ld slot_removals=%ld slot_restores=%ld "
	       "deaths=%ld hangs=%ld guest_errors=%ld guest_iters=%u guest_allones=%u "
	       "kvm_exits=%ld mmu=%s iommu=%s restore=%s kernel=%s seconds=%.2f\n",
	       cycles_done, hit_cycles, memfault_exits, memfault_retries, ur_mmio, ur_reads,
	       ur_writes, ur_with_slot, fwd_mmio, slot_removals, slot_restores, deaths, hangs, guest_errors,
	       *(volatile uint32_t *)(ram + PARAM_GPA), *(volatile uint32_t *)(ram + PARAM_GPA + 0x10),
	       kvm_exits, mmu_name, iommu_name, opt.restore_eager ? "toggler" : "vcpu", u.release,
	       secs);
	fflush(stdout);
	if (wd)
		_exit(code);	/* a thread is stuck in the kernel: do not join it */
	return code;
}
