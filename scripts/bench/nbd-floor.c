/* nbd-floor: the least CPU an NBD server can spend per 4 KiB request on this
 * machine, the kernel's share alone. A client thread sends batches of BATCH
 * requests over a unix socket pair (headers only for reads; header and 4 KiB
 * payload for writes) and reads the replies; the server thread does only the
 * system calls a server cannot avoid, batched as well as they can be, with no
 * protocol logic, no event loop and no allocation:
 *
 *   read-copy    receive the batch's headers; per request pread 4 KiB at a
 *                random page of FILE into a buffer; one sendmsg of all
 *                replies (16-byte header + data) per batch
 *   read-splice  receive the headers; per request write the 16-byte header
 *                into a pipe and splice the page in from FILE; one splice
 *                of the pipe to the socket per batch
 *   read-map     receive the headers; one sendmsg of all replies per batch,
 *                the data straight from a shared mapping of FILE (the
 *                kernel copies it from the page cache into the socket)
 *   read-vmsplice receive the headers; one vmsplice per batch puts every
 *                header and the mapped file pages into a pipe by reference;
 *                one splice of the pipe to the socket
 *   read-vmsplice-arena  as read-vmsplice, but safe for a real server: the
 *                headers' page is dropped (MADV_DONTNEED) after each batch,
 *                so the next batch's headers land in a fresh page while the
 *                socket still holds the old one
 *   write        receive the batch's headers and payloads; per request
 *                pwrite 4 KiB at a random page of FILE; one send of the
 *                batch's 16-byte replies
 *
 * It prints the server thread's CPU time (user + system, getrusage) per
 * request. FILE should be in the page cache (and writable for `write`).
 * Usage: nbd-floor read-copy|read-splice|read-map|read-vmsplice[-arena]|write FILE [REQUESTS]
 * (cc -DBATCH=N changes the batch size)
 * Built and run by scripts/bench/nbd-floor.sh.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#ifndef BATCH
#define BATCH 32
#endif
#define PAGE 4096
#define REQ_HDR 32
#define REPLY_HDR 16

enum mode { READ_COPY, READ_SPLICE, READ_MAP, READ_VMSPLICE, READ_VMSPLICE_ARENA, WRITE };

static int sock[2];
static long requests = 400000;
static enum mode mode;

static void die(const char *what)
{
	perror(what);
	exit(1);
}

static void put_all(int fd, const char *p, size_t n)
{
	while (n) {
		ssize_t k = write(fd, p, n);
		if (k <= 0)
			die("write");
		p += k;
		n -= (size_t)k;
	}
}

static void get_all(int fd, char *p, size_t n)
{
	while (n) {
		ssize_t k = read(fd, p, n);
		if (k <= 0)
			die("read");
		p += k;
		n -= (size_t)k;
	}
}

static void *client(void *arg)
{
	(void)arg;
	size_t out = BATCH * (REQ_HDR + (mode == WRITE ? PAGE : 0));
	size_t in = BATCH * (REPLY_HDR + (mode == WRITE ? 0 : PAGE));
	char *req = calloc(1, out), *rep = malloc(in);
	if (!req || !rep)
		die("malloc");
	for (long i = 0; i < requests; i += BATCH) {
		put_all(sock[1], req, out);
		get_all(sock[1], rep, in);
	}
	return NULL;
}

static double thread_cpu(void)
{
	struct rusage r;
	getrusage(RUSAGE_THREAD, &r);
	return r.ru_utime.tv_sec + r.ru_utime.tv_usec / 1e6 + r.ru_stime.tv_sec + r.ru_stime.tv_usec / 1e6;
}

/* sendmsg all of iov[0..n), however many calls it takes. */
static void send_iov(int fd, struct iovec *iov, int n)
{
	while (n) {
		struct msghdr m = { .msg_iov = iov, .msg_iovlen = (size_t)n };
		ssize_t k = sendmsg(fd, &m, 0);
		if (k <= 0)
			die("sendmsg");
		while (n && (size_t)k >= iov->iov_len) {
			k -= (ssize_t)iov->iov_len;
			iov++;
			n--;
		}
		if (n) {
			iov->iov_base = (char *)iov->iov_base + k;
			iov->iov_len -= (size_t)k;
		}
	}
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: %s read-copy|read-splice|read-map|read-vmsplice|write FILE [REQUESTS]\n", argv[0]);
		return 2;
	}
	if (!strcmp(argv[1], "read-copy"))
		mode = READ_COPY;
	else if (!strcmp(argv[1], "read-splice"))
		mode = READ_SPLICE;
	else if (!strcmp(argv[1], "read-map"))
		mode = READ_MAP;
	else if (!strcmp(argv[1], "read-vmsplice"))
		mode = READ_VMSPLICE;
	else if (!strcmp(argv[1], "read-vmsplice-arena"))
		mode = READ_VMSPLICE_ARENA;
	else if (!strcmp(argv[1], "write"))
		mode = WRITE;
	else {
		fprintf(stderr, "unknown mode %s\n", argv[1]);
		return 2;
	}
	if (argc > 3)
		requests = atol(argv[3]);
	int fd = open(argv[2], mode == WRITE ? O_RDWR : O_RDONLY);
	if (fd < 0)
		die(argv[2]);
	long pages = lseek(fd, 0, SEEK_END) / PAGE;
	if (pages < 1) {
		fprintf(stderr, "%s: smaller than a page\n", argv[2]);
		return 1;
	}
	char *map = NULL;
	if (mode == READ_MAP || mode == READ_VMSPLICE || mode == READ_VMSPLICE_ARENA) {
		map = mmap(NULL, (size_t)pages * PAGE, PROT_READ, MAP_SHARED, fd, 0);
		if (map == MAP_FAILED)
			die("mmap");
	}
	if (socketpair(AF_UNIX, SOCK_STREAM, 0, sock))
		die("socketpair");
	int pipefd[2];
	if (pipe2(pipefd, O_NONBLOCK))
		die("pipe2");
	fcntl(pipefd[1], F_SETPIPE_SZ, 1 << 20);
	pthread_t t;
	if (pthread_create(&t, NULL, client, NULL))
		die("pthread_create");

	size_t in = BATCH * (REQ_HDR + (mode == WRITE ? PAGE : 0));
	char *reqs = malloc(in), *data = aligned_alloc(PAGE, BATCH * PAGE);
	char replies[BATCH * REPLY_HDR] = { 0 };
	if (!reqs || !data)
		die("malloc");
	/* Reply headers sent by reference, in a page of their own. */
	char *hdrs = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (hdrs == MAP_FAILED)
		die("mmap");
	srand(1);
	double t0 = thread_cpu();
	for (long i = 0; i < requests; i += BATCH) {
		get_all(sock[0], reqs, in);
		if (mode == READ_COPY) {
			struct iovec iov[2 * BATCH];
			for (int k = 0; k < BATCH; k++) {
				if (pread(fd, data + k * PAGE, PAGE, (off_t)(rand() % pages) * PAGE) != PAGE)
					die("pread");
				iov[2 * k] = (struct iovec){ replies + k * REPLY_HDR, REPLY_HDR };
				iov[2 * k + 1] = (struct iovec){ data + k * PAGE, PAGE };
			}
			send_iov(sock[0], iov, 2 * BATCH);
		} else if (mode == READ_SPLICE) {
			size_t staged = 0;
			for (int k = 0; k < BATCH; k++) {
				loff_t off = (loff_t)(rand() % pages) * PAGE;
				if (write(pipefd[1], replies + k * REPLY_HDR, REPLY_HDR) != REPLY_HDR)
					die("write to pipe");
				if (splice(fd, &off, pipefd[1], NULL, PAGE, SPLICE_F_NONBLOCK) != PAGE)
					die("splice from file");
				staged += REPLY_HDR + PAGE;
			}
			while (staged) {
				ssize_t k = splice(pipefd[0], NULL, sock[0], NULL, staged, 0);
				if (k <= 0)
					die("splice to socket");
				staged -= (size_t)k;
			}
		} else if (mode == READ_MAP || mode == READ_VMSPLICE || mode == READ_VMSPLICE_ARENA) {
			struct iovec iov[2 * BATCH];
			for (int k = 0; k < BATCH; k++) {
				iov[2 * k] = (struct iovec){ hdrs + k * REPLY_HDR, REPLY_HDR };
				iov[2 * k + 1] = (struct iovec){ map + (size_t)(rand() % pages) * PAGE, PAGE };
			}
			if (mode == READ_MAP) {
				send_iov(sock[0], iov, 2 * BATCH);
			} else {
				/* By reference: the headers must not change until the peer
				 * has read them; -arena drops their page after each batch. */
				if (vmsplice(pipefd[1], iov, 2 * BATCH, SPLICE_F_NONBLOCK) != BATCH * (REPLY_HDR + PAGE))
					die("vmsplice");
				size_t staged = BATCH * (REPLY_HDR + PAGE);
				while (staged) {
					ssize_t k = splice(pipefd[0], NULL, sock[0], NULL, staged, 0);
					if (k <= 0)
						die("splice to socket");
					staged -= (size_t)k;
				}
				if (mode == READ_VMSPLICE_ARENA) {
					if (madvise(hdrs, PAGE, MADV_DONTNEED))
						die("madvise");
					for (int k = 0; k < BATCH; k++)
						hdrs[k * REPLY_HDR] = 0x67; /* the next headers fault in a fresh page */
				}
			}
		} else {
			for (int k = 0; k < BATCH; k++) {
				char *payload = reqs + k * (REQ_HDR + PAGE) + REQ_HDR;
				if (pwrite(fd, payload, PAGE, (off_t)(rand() % pages) * PAGE) != PAGE)
					die("pwrite");
			}
			put_all(sock[0], replies, sizeof replies);
		}
	}
	double cpu = thread_cpu() - t0;
	pthread_join(t, NULL);
	printf("%s: %.2f us of server CPU per request (%ld requests)\n", argv[1], cpu / requests * 1e6, requests);
	return 0;
}
