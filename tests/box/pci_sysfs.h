/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * What the box programs share: the clock, and finding QEMU's edu device (1234:11e8) in sysfs.
 * Static functions in a header, so each program stays one static binary from one .c file.
 */
#ifndef BOX_PCI_SYSFS_H
#define BOX_PCI_SYSFS_H

#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define EDU_VENDOR 0x1234
#define EDU_DEVICE 0x11e8

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* A sysfs file's contents without the trailing newline; -1 if it cannot be read. */
static int read_file(const char *path, char *buf, size_t len)
{
	int fd = open(path, O_RDONLY);
	ssize_t n;

	if (fd < 0)
		return -1;
	n = read(fd, buf, len - 1);
	close(fd);
	if (n < 0)
		return -1;
	buf[n] = 0;
	while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == ' '))
		buf[--n] = 0;
	return 0;
}

/* A hex attribute of a PCI device (vendor, device, ...); ~0UL if there is none. */
static unsigned long sysfs_hex(const char *bdf, const char *attr)
{
	char path[512], buf[64];

	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/%s", bdf, attr);
	if (read_file(path, buf, sizeof(buf)))
		return ~0UL;
	return strtoul(buf, NULL, 16);
}

/* The first edu device's BDF into bdf; 0 if there is none. */
static int find_edu(char *bdf, size_t len)
{
	DIR *d = opendir("/sys/bus/pci/devices");
	struct dirent *e;
	int found = 0;

	if (!d)
		return 0;
	while (!found && (e = readdir(d))) {
		if (e->d_name[0] == '.')
			continue;
		if (sysfs_hex(e->d_name, "vendor") == EDU_VENDOR &&
		    sysfs_hex(e->d_name, "device") == EDU_DEVICE) {
			snprintf(bdf, len, "%s", e->d_name);
			found = 1;
		}
	}
	closedir(d);
	return found;
}

#endif
