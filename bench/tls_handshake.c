/* tls_handshake: SMTP TLS handshakes, one after the other, full or resumed.
 *
 *   tls_handshake HOST PORT SECONDS MODE VERSION STARTTLS
 *
 * MODE "new": every connection does a full handshake. MODE "resume": the session of the
 * previous connection is offered (a ticket, TLS 1.3 or 1.2), so a server that resumes
 * skips the certificate and key exchange. VERSION "1.2" or "1.3". STARTTLS 1: 220, EHLO,
 * STARTTLS, 220, then TLS; 0: TLS from the first byte (implicit TLS, port 465 style).
 * After the handshake the client reads one reply inside TLS (the 220 greeting, or the
 * answer to EHLO) - by then a TLS 1.3 ticket has arrived - and closes.
 * Prints: "connections N reused R seconds S per_second P".
 * Built by bench/tls_resume.py with cc ... -lssl -lcrypto (Debian: libssl-dev).
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
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

/* Read a plain SMTP reply (all its lines); its code or -1. */
static int plain_reply(int fd) {
    char buf[4096];
    size_t len = 0;
    for (;;) {
        ssize_t n = recv(fd, buf + len, sizeof(buf) - 1 - len, 0);
        if (n <= 0) return -1;
        len += (size_t)n;
        buf[len] = 0;
        char *line = buf;
        for (;;) {
            char *end = strstr(line, "\r\n");
            if (!end) break;
            if (end - line >= 4 && line[3] == ' ') return atoi(line);
            line = end + 2;
        }
        if (len >= sizeof(buf) - 1) return -1;
    }
}

static int tls_reply(SSL *ssl) {
    char buf[4096];
    size_t len = 0;
    for (;;) {
        int n = SSL_read(ssl, buf + len, (int)(sizeof(buf) - 1 - len));
        if (n <= 0) return -1;
        len += (size_t)n;
        buf[len] = 0;
        char *line = buf;
        for (;;) {
            char *end = strstr(line, "\r\n");
            if (!end) break;
            if (end - line >= 4 && line[3] == ' ') return atoi(line);
            line = end + 2;
        }
        if (len >= sizeof(buf) - 1) return -1;
    }
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: %s HOST PORT SECONDS new|resume 1.2|1.3 STARTTLS(0|1)\n", argv[0]);
        return 2;
    }
    const char *host = argv[1];
    int port = atoi(argv[2]);
    double seconds = atof(argv[3]);
    int resume = strcmp(argv[4], "resume") == 0;
    int v13 = strcmp(argv[5], "1.3") == 0;
    int starttls = atoi(argv[6]);
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_min_proto_version(ctx, v13 ? TLS1_3_VERSION : TLS1_2_VERSION);
    SSL_CTX_set_max_proto_version(ctx, v13 ? TLS1_3_VERSION : TLS1_2_VERSION);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT);
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof(addr));
    addr.sin_family = AF_INET;
    addr.sin_port = htons((unsigned short)port);
    inet_pton(AF_INET, host, &addr.sin_addr);
    SSL_SESSION *session = NULL;
    long count = 0, reused = 0, failed = 0;
    double start = now();
    while (now() - start < seconds) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0) {
            perror("connect");
            return 1;
        }
        if (starttls) {
            const char *ehlo = "EHLO bench.test\r\n", *stls = "STARTTLS\r\n";
            if (plain_reply(fd) != 220 || send(fd, ehlo, strlen(ehlo), 0) < 0 ||
                plain_reply(fd) != 250 || send(fd, stls, strlen(stls), 0) < 0 ||
                plain_reply(fd) != 220) {
                failed++;
                close(fd);
                continue;
            }
        }
        SSL *ssl = SSL_new(ctx);
        SSL_set_fd(ssl, fd);
        if (resume && session) SSL_set_session(ssl, session);
        int ok = SSL_connect(ssl) == 1;
        if (ok && starttls) {
            const char *ehlo = "EHLO bench.test\r\n";
            ok = SSL_write(ssl, ehlo, (int)strlen(ehlo)) > 0 && tls_reply(ssl) == 250;
        } else if (ok) {
            ok = tls_reply(ssl) == 220;
        }
        if (ok) {
            count++;
            if (SSL_session_reused(ssl)) reused++;
            if (resume) {
                SSL_SESSION *next = SSL_get1_session(ssl);
                if (session) SSL_SESSION_free(session);
                session = next;
            }
            SSL_shutdown(ssl);
        } else {
            failed++;
            ERR_clear_error();
        }
        SSL_free(ssl);
        close(fd);
    }
    double elapsed = now() - start;
    printf("connections %ld reused %ld failed %ld seconds %.2f per_second %.1f\n", count, reused,
           failed, elapsed, count / elapsed);
    return 0;
}
