// One system call on every thread of the process (threads.go says why it
// lives here); its arguments beyond the third are zero, as prctl wants them.
// The calling thread sends each other thread SIGSYS with tgkill; the handler
// makes the call on its own thread and reports back through a futex word.
// Threads are taken from /proc/self/task until a pass finds none not yet
// done, so a thread started meanwhile by a thread not yet done is found too,
// and one started by a done thread inherits the effect. The calling thread
// goes last.
//
// SIGSYS because the Go runtime never blocks it on its threads (it is a
// signal Go throws on), while the real-time signals may arrive blocked in
// the mask inherited from the parent. Nothing else may raise it during the
// call: the sandbox installs its seccomp filter (whose violations kill, not
// trap) only later.

#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

enum {
	max_threads = 4096,
	wait_slice_ns = 10 * 1000 * 1000, // then check that the thread still lives
	give_up_ns = 2000L * 1000 * 1000, // a thread that never answers
};

// The request in flight; one at a time (call_lock).
static struct {
	long nr, a1, a2, a3;
	_Atomic pid_t target;
	_Atomic int done;     // futex word: 0 waiting, 1 answered
	_Atomic long result;  // 0 or -errno
} req;

static pthread_mutex_t call_lock = PTHREAD_MUTEX_INITIALIZER;

static void on_sigsys(int sig, siginfo_t *info, void *ctx)
{
	(void)sig;
	(void)ctx;
	int saved = errno;
	// Only our own request, addressed to this very thread.
	if (info->si_code != SI_TKILL || info->si_pid != getpid() ||
	    atomic_load(&req.target) != (pid_t)syscall(SYS_gettid)) {
		errno = saved;
		return;
	}
	long r = syscall(req.nr, req.a1, req.a2, req.a3, 0L, 0L, 0L);
	atomic_store(&req.result, r == -1 ? -errno : 0);
	atomic_store(&req.done, 1);
	syscall(SYS_futex, &req.done, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
	errno = saved;
}

static long elapsed_ns(const struct timespec *since)
{
	struct timespec now;
	clock_gettime(CLOCK_MONOTONIC, &now);
	return (now.tv_sec - since->tv_sec) * 1000000000L + (now.tv_nsec - since->tv_nsec);
}

// run_on makes the request on thread tid: 0 or -errno from the call, 1 when
// the thread ended before it answered, -ETIMEDOUT when it never answered.
static long run_on(pid_t pid, pid_t tid)
{
	atomic_store(&req.done, 0);
	atomic_store(&req.target, tid);
	if (syscall(SYS_tgkill, pid, tid, SIGSYS) != 0)
		return errno == ESRCH ? 1 : -errno;
	struct timespec start;
	clock_gettime(CLOCK_MONOTONIC, &start);
	while (!atomic_load(&req.done)) {
		struct timespec slice = {0, wait_slice_ns};
		syscall(SYS_futex, &req.done, FUTEX_WAIT_PRIVATE, 0, &slice, NULL, 0);
		if (atomic_load(&req.done))
			break;
		if (syscall(SYS_tgkill, pid, tid, 0) != 0 && errno == ESRCH)
			return 1;
		if (elapsed_ns(&start) > give_up_ns)
			return -ETIMEDOUT;
	}
	return atomic_load(&req.result);
}

static int seen(const pid_t *done, int n, pid_t tid)
{
	for (int i = 0; i < n; i++)
		if (done[i] == tid)
			return 1;
	return 0;
}

long vtpm_all_threads_syscall(long nr, long a1, long a2, long a3)
{
	pid_t *done = malloc(max_threads * sizeof(pid_t));
	if (done == NULL)
		return -ENOMEM;
	pthread_mutex_lock(&call_lock);
	req.nr = nr, req.a1 = a1, req.a2 = a2, req.a3 = a3;

	struct sigaction sa = {0}, saved;
	sa.sa_sigaction = on_sigsys;
	sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
	sigfillset(&sa.sa_mask);
	long err = 0;
	if (sigaction(SIGSYS, &sa, &saved) != 0) {
		err = -errno;
		goto out;
	}
	pid_t pid = getpid(), self = (pid_t)syscall(SYS_gettid);
	int n = 0;
	for (int fresh = 1; fresh && err == 0;) {
		fresh = 0;
		DIR *dir = opendir("/proc/self/task");
		if (dir == NULL) {
			err = -errno;
			break;
		}
		struct dirent *e;
		while (err == 0 && (e = readdir(dir)) != NULL) {
			pid_t tid = (pid_t)atoi(e->d_name);
			if (tid <= 0 || tid == self || seen(done, n, tid))
				continue;
			if (n == max_threads) {
				err = -E2BIG;
				break;
			}
			done[n++] = tid;
			fresh = 1;
			long r = run_on(pid, tid);
			if (r < 0)
				err = r;
		}
		closedir(dir);
	}
	if (err == 0 && syscall(nr, a1, a2, a3, 0L, 0L, 0L) == -1)
		err = -errno;
	atomic_store(&req.target, 0);
	// A thread that never answered may still take its signal: it must
	// find this handler, which ignores it, not the Go runtime's, which
	// would end the process on SIGSYS.
	if (err != -ETIMEDOUT)
		sigaction(SIGSYS, &saved, NULL);
out:
	pthread_mutex_unlock(&call_lock);
	free(done);
	return err;
}
