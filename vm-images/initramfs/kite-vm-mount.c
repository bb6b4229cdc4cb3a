/*
 * kite-vm-mount: a direct mount(2) for the kite QEMU guest.
 *
 * busybox mount turns a regular-file source into a loop device before
 * calling mount(2). File-backed EROFS (Linux 6.12+) needs the opposite: the
 * file path itself as the source, and regular files as device= extras. This
 * helper passes its arguments to mount(2) untouched.
 *
 * Usage: kite-vm-mount [-r] -t FSTYPE [-o DATA] SOURCE TARGET
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	const char *fstype = NULL, *data = NULL;
	unsigned long flags = 0;
	int opt;

	while ((opt = getopt(argc, argv, "rt:o:")) != -1) {
		switch (opt) {
		case 'r': flags |= MS_RDONLY; break;
		case 't': fstype = optarg; break;
		case 'o': data = optarg; break;
		default: goto usage;
		}
	}
	if (!fstype || argc - optind != 2)
		goto usage;
	if (mount(argv[optind], argv[optind + 1], fstype, flags, data) != 0) {
		fprintf(stderr, "kite-vm-mount: mount -t %s %s %s: %s\n", fstype,
			argv[optind], argv[optind + 1], strerror(errno));
		return 1;
	}
	return 0;
usage:
	fprintf(stderr, "usage: kite-vm-mount [-r] -t FSTYPE [-o DATA] SOURCE TARGET\n");
	return 2;
}
