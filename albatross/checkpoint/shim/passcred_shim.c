/*
 * LD_PRELOAD shim for CRIU 4.1.1 on Linux >= 6.16.
 *
 * Since 6.16 the kernel answers SO_PASSCRED / SO_PASSSEC only on sockets that can
 * carry credentials (unix and netlink); on a TCP socket getsockopt() fails with
 * EOPNOTSUPP. CRIU 4.1.1 reads both options from every socket it dumps and gives up
 * ("Can't get 1:16 opt"), so `--tcp-established` cannot work. CRIU 4.2 ignores the
 * error; this shim does the same for 4.1.1: for those two options only, and only when
 * the kernel said EOPNOTSUPP or ENOPROTOOPT, it reports the option as off (0), which
 * is the truth for a socket that cannot have it. Setting them to 0 on such a socket
 * (what a restore does) is likewise a successful no-op. Every other call goes
 * straight to libc.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <string.h>
#include <sys/socket.h>

#ifndef SO_PASSCRED
#define SO_PASSCRED 16
#endif
#ifndef SO_PASSSEC
#define SO_PASSSEC 34
#endif

typedef int (*getsockopt_fn)(int, int, int, void *, socklen_t *);
typedef int (*setsockopt_fn)(int, int, int, const void *, socklen_t);

static int is_cred_opt(int level, int name)
{
	return level == SOL_SOCKET && (name == SO_PASSCRED || name == SO_PASSSEC);
}

static int unsupported(int err)
{
	return err == EOPNOTSUPP || err == ENOPROTOOPT;
}

int getsockopt(int fd, int level, int name, void *val, socklen_t *len)
{
	static getsockopt_fn real;
	int ret, err;

	if (!real)
		real = (getsockopt_fn)dlsym(RTLD_NEXT, "getsockopt");
	ret = real(fd, level, name, val, len);
	err = errno;
	if (ret < 0 && is_cred_opt(level, name) && unsupported(err) && val && len &&
	    *len >= sizeof(int)) {
		memset(val, 0, sizeof(int));
		*len = sizeof(int);
		return 0;
	}
	errno = err;
	return ret;
}

int setsockopt(int fd, int level, int name, const void *val, socklen_t len)
{
	static setsockopt_fn real;
	int ret, err;

	if (!real)
		real = (setsockopt_fn)dlsym(RTLD_NEXT, "setsockopt");
	ret = real(fd, level, name, val, len);
	err = errno;
	if (ret < 0 && is_cred_opt(level, name) && unsupported(err) && val &&
	    len >= (socklen_t)sizeof(int) && *(const int *)val == 0)
		return 0;
	errno = err;
	return ret;
}
