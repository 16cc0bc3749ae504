/* smtp_latency: one plain SMTP session after another, the latency of each on stdout.
 *
 *   smtp_latency HOST PORT RCPT SECONDS
 *
 * Each session: connect, 220, EHLO, MAIL, RCPT, DATA, a 2 KB message, QUIT.  Prints one
 * line per session: "<milliseconds from connect to the 250 after the message> <code>".
 * Built by bench/scan_bomb.py with cc; a C client so that its timing does not share a
 * Python interpreter with anything it measures.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Read one SMTP reply (all its lines); return its code or -1. */
static int reply(int fd) {
    static char buf[8192];
    size_t len = 0;
    for (;;) {
        ssize_t n = read(fd, buf + len, sizeof buf - 1 - len);
        if (n <= 0) return -1;
        len += (size_t)n;
        buf[len] = 0;
        char *line = buf;
        char *nl;
        while ((nl = strchr(line, '\n')) != NULL) {   /* complete lines: "ddd " ends it */
            if (nl - line >= 4 && line[3] == ' ') return atoi(line);
            line = nl + 1;
        }
        if (len >= sizeof buf - 1) len = 0;
    }
}

static int say(int fd, const char *text) {
    size_t left = strlen(text);
    while (left) {
        ssize_t n = write(fd, text, left);
        if (n <= 0) return -1;
        text += n;
        left -= (size_t)n;
    }
    return reply(fd);
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s HOST PORT RCPT SECONDS\n", argv[0]);
        return 2;
    }
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((unsigned short)atoi(argv[2]));
    inet_pton(AF_INET, argv[1], &addr.sin_addr);
    char rcpt[512], body[4096];
    snprintf(rcpt, sizeof rcpt, "RCPT TO:<%s>\r\n", argv[3]);
    int off = snprintf(body, sizeof body, "Subject: plain\r\nFrom: a@plain.test\r\n\r\n");
    for (int i = 0; i < 26; i++)
        off += snprintf(body + off, sizeof body - off,
                        "a plain line of text in a plain message, number %02d....\r\n", i);
    snprintf(body + off, sizeof body - off, ".\r\n");
    double stop = now() + atof(argv[4]);
    while (now() < stop) {
        double t0 = now();
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
            perror("connect");
            return 1;
        }
        int code = reply(fd);
        if (code == 220) code = say(fd, "EHLO bench.test\r\n");
        if (code == 250) code = say(fd, "MAIL FROM:<a@plain.test>\r\n");
        if (code == 250) code = say(fd, rcpt);
        if (code == 250) code = say(fd, "DATA\r\n");
        if (code == 354) code = say(fd, body);
        double t1 = now();
        if (code > 0) say(fd, "QUIT\r\n");
        close(fd);
        printf("%.3f %d\n", (t1 - t0) * 1000.0, code);
        fflush(stdout);
    }
    return 0;
}
