/* Load generator and backend for bench/proxy_throughput.py (C, epoll; Linux).
 *
 *   proxy_load backend PORT
 *       An epoll server on 127.0.0.1:PORT: answers "ok" to the first bytes of a
 *       connection, then reads and drops everything; closes after the peer's EOF.
 *       A connection starting "GET " gets a short HTTP/1.0 answer and is closed.
 *   proxy_load conn PORT HELLO_FILE SECONDS INFLIGHT
 *       Keeps INFLIGHT connections in flight for SECONDS: connect, send the bytes of
 *       HELLO_FILE (a ClientHello with SNI), read "ok", close with RST (SO_LINGER 0,
 *       so client ports do not pile up in TIME_WAIT); prints the completed count.
 *   proxy_load bulk PORT HELLO_FILE MIB
 *       One connection: HELLO_FILE, then MIB MiB, then shutdown(SHUT_WR); waits for
 *       the backend's "ok" and EOF; prints MiB/s (clock from connect to EOF).
 *
 * Built by the benchmark with `cc -O2`; no dependency beyond libc.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MAXEV 256

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    perror(what);
    exit(2);
}

static struct sockaddr_in loopback(int port) {
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
}

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) die(path);
    struct stat st;
    fstat(fileno(f), &st);
    char *buf = malloc(st.st_size + 1);
    *len = fread(buf, 1, st.st_size, f);
    fclose(f);
    return buf;
}

/* -- backend ------------------------------------------------------------------ */

static int backend(int port) {
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = loopback(port);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
    if (listen(ls, 4096) < 0) die("listen");
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)ls << 1};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    static char buf[1 << 18];
    struct epoll_event evs[MAXEV];
    for (;;) {
        int n = epoll_wait(ep, evs, MAXEV, -1);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.u64 >> 1;
            int answered = evs[i].data.u64 & 1;
            if (fd == ls) {
                for (;;) {
                    int c = accept4(ls, NULL, NULL, SOCK_NONBLOCK);
                    if (c < 0) break;
                    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    struct epoll_event ce = {.events = EPOLLIN, .data.u64 = (uint64_t)c << 1};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &ce);
                }
                continue;
            }
            for (;;) {
                ssize_t r = read(fd, buf, sizeof buf);
                if (r > 0) {
                    if (!answered && r >= 4 && !memcmp(buf, "GET ", 4)) {
                        /* an HTTP/1.0 request (openssl s_time -www): answer and close */
                        static const char resp[] =
                            "HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok";
                        if (write(fd, resp, sizeof resp - 1) < 0) { /* gone */ }
                        close(fd);
                        break;
                    }
                    if (!answered) {
                        answered = 1;
                        if (write(fd, "ok", 2) < 0) { /* the client may be gone */ }
                        struct epoll_event ce = {.events = EPOLLIN,
                                                 .data.u64 = ((uint64_t)fd << 1) | 1};
                        epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ce);
                    }
                    if (r < (ssize_t)sizeof buf) break;
                    continue;
                }
                if (r < 0 && (errno == EAGAIN || errno == EINTR)) break;
                close(fd); /* EOF or error (closing removes it from epoll) */
                break;
            }
        }
    }
    return 0;
}

/* -- new connections ---------------------------------------------------------------- */

static int conn_open(int ep, struct sockaddr_in *a) {
    int s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (s < 0) return -1;
    struct linger lg = {1, 0};
    setsockopt(s, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    int one = 1;
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(s, (struct sockaddr *)a, sizeof *a) < 0 && errno != EINPROGRESS) {
        close(s);
        return -1;
    }
    /* bit 0 of data: 0 = waiting for connect, 1 = hello sent, waiting for "ok" */
    struct epoll_event ev = {.events = EPOLLOUT, .data.u64 = (uint64_t)s << 1};
    epoll_ctl(ep, EPOLL_CTL_ADD, s, &ev);
    return s;
}

static int conns(int port, const char *hello_path, double seconds, int inflight) {
    size_t hlen;
    char *hello = read_file(hello_path, &hlen);
    struct sockaddr_in a = loopback(port);
    int ep = epoll_create1(0);
    for (int i = 0; i < inflight; i++) conn_open(ep, &a);
    long done = 0, failed = 0;
    double end = now() + seconds;
    struct epoll_event evs[MAXEV];
    char buf[4096];
    while (now() < end) {
        int n = epoll_wait(ep, evs, MAXEV, 100);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.u64 >> 1;
            int state = evs[i].data.u64 & 1;
            int ok = 0, finished = 0;
            if (state == 0) {
                int err = 0;
                socklen_t el = sizeof err;
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el);
                if (err || write(fd, hello, hlen) != (ssize_t)hlen) {
                    finished = 1;
                } else {
                    struct epoll_event ev = {.events = EPOLLIN,
                                             .data.u64 = ((uint64_t)fd << 1) | 1};
                    epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev);
                }
            } else {
                ssize_t r = read(fd, buf, sizeof buf);
                if (r < 0 && errno == EAGAIN) continue;
                finished = 1;
                ok = r >= 2 && buf[0] == 'o' && buf[1] == 'k';
            }
            if (finished) {
                close(fd);
                if (ok) done++; else failed++;
                conn_open(ep, &a);
            }
        }
    }
    printf("%ld %ld\n", done, failed);
    return 0;
}

/* -- bulk ----------------------------------------------------------------------------- */

static int bulk(int port, const char *hello_path, long mib) {
    size_t hlen;
    char *hello = read_file(hello_path, &hlen);
    struct sockaddr_in a = loopback(port);
    int s = socket(AF_INET, SOCK_STREAM, 0);
    double start = now();
    if (connect(s, (struct sockaddr *)&a, sizeof a) < 0) die("connect");
    if (write(s, hello, hlen) != (ssize_t)hlen) die("write hello");
    size_t block = 1 << 20;
    char *data = malloc(block);
    memset(data, 0x17, block);
    for (long i = 0; i < mib; i++) {
        size_t off = 0;
        while (off < block) {
            ssize_t w = write(s, data + off, block - off);
            if (w < 0) die("write");
            off += w;
        }
    }
    shutdown(s, SHUT_WR);
    char buf[4096];
    size_t got = 0;
    for (;;) {
        ssize_t r = read(s, buf, sizeof buf);
        if (r < 0) die("read");
        if (r == 0) break;
        got += r;
    }
    double elapsed = now() - start;
    if (got < 2) {
        fprintf(stderr, "no answer from the backend\n");
        return 1;
    }
    printf("%.1f\n", mib / elapsed);
    return 0;
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    if (argc == 3 && !strcmp(argv[1], "backend")) return backend(atoi(argv[2]));
    if (argc == 6 && !strcmp(argv[1], "conn"))
        return conns(atoi(argv[2]), argv[3], atof(argv[4]), atoi(argv[5]));
    if (argc == 5 && !strcmp(argv[1], "bulk"))
        return bulk(atoi(argv[2]), argv[3], atol(argv[4]));
    fprintf(stderr, "usage: proxy_load backend PORT | conn PORT HELLO SECONDS INFLIGHT | "
                    "bulk PORT HELLO MIB\n");
    return 2;
}
