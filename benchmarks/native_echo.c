/* The native echo of bench_transfer: the same store-and-forward echo as its `tcp` baseline
 * (an 8-byte big-endian length, then the bytes; the whole frame is read before it is sent
 * back), in C, over plain TCP or OpenSSL TLS: what the kernel's TCP and OpenSSL move on this
 * machine with no interpreter between them, so a run shows how much of a Python transport's
 * time is Python's.
 *
 *   native_echo server HOST [CERT KEY]                    prints "ready HOST:PORT"
 *   native_echo client HOST PORT SIZE REPS WARMUP [CA]    prints {"s": median seconds}
 *
 * bench_transfer builds it with `cc -O2 native_echo.c -lssl -lcrypto` when a compiler and
 * OpenSSL's headers are at hand, and leaves the row out otherwise.
 */
#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    int fd;
    SSL *ssl; /* NULL: plain TCP */
} conn_t;

static _Noreturn void die(const char *what) {
    fprintf(stderr, "native_echo: %s\n", what);
    ERR_print_errors_fp(stderr);
    exit(1);
}

/* Whole buffers both ways: TLS in records of at most 16 KiB, TCP in what the kernel takes. */
static void put(conn_t *c, const unsigned char *p, size_t n) {
    while (n > 0) {
        size_t done = 0;
        if (c->ssl) {
            if (SSL_write_ex(c->ssl, p, n, &done) != 1) die("SSL_write failed");
        } else {
            ssize_t w = send(c->fd, p, n, 0);
            if (w <= 0) die("send failed");
            done = (size_t)w;
        }
        p += done;
        n -= done;
    }
}

static int get(conn_t *c, unsigned char *p, size_t n) { /* 0 when the peer closed */
    while (n > 0) {
        size_t done = 0;
        if (c->ssl) {
            if (SSL_read_ex(c->ssl, p, n, &done) != 1) return 0;
        } else {
            ssize_t r = recv(c->fd, p, n, 0);
            if (r <= 0) return 0;
            done = (size_t)r;
        }
        p += done;
        n -= done;
    }
    return 1;
}

static uint64_t be64(const unsigned char *b) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v = (v << 8) | b[i];
    return v;
}

static void nodelay(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static _Noreturn void serve(const char *host, const char *cert, const char *key) {
    SSL_CTX *ctx = NULL;
    if (cert) {
        ctx = SSL_CTX_new(TLS_server_method());
        if (!ctx || SSL_CTX_use_certificate_chain_file(ctx, cert) != 1 ||
            SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1)
            die("cannot load the certificate");
    }
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = 0};
    if (listener < 0 || inet_pton(AF_INET, host, &addr.sin_addr) != 1 ||
        bind(listener, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(listener, 4) != 0)
        die("cannot listen");
    socklen_t len = sizeof addr;
    getsockname(listener, (struct sockaddr *)&addr, &len);
    printf("ready %s:%d\n", host, ntohs(addr.sin_port));
    fflush(stdout);
    unsigned char *buffer = NULL;
    size_t capacity = 0;
    for (;;) { /* one client at a time, until killed */
        conn_t c = {.fd = accept(listener, NULL, NULL), .ssl = NULL};
        if (c.fd < 0) die("accept failed");
        nodelay(c.fd);
        if (ctx) {
            c.ssl = SSL_new(ctx);
            SSL_set_fd(c.ssl, c.fd);
            if (SSL_accept(c.ssl) != 1) die("TLS handshake failed");
        }
        unsigned char header[8];
        while (get(&c, header, 8)) {
            size_t size = be64(header);
            if (size > capacity) {
                free(buffer);
                buffer = malloc(size);
                capacity = size;
                if (!buffer) die("out of memory");
            }
            if (!get(&c, buffer, size)) break;
            put(&c, header, 8);
            put(&c, buffer, size);
        }
        if (c.ssl) SSL_free(c.ssl);
        close(c.fd);
    }
}

static int compare(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static int client(const char *host, const char *port, size_t size, int reps, int warmup,
                  const char *ca) {
    struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM}, *found;
    if (getaddrinfo(host, port, &hints, &found) != 0) die("cannot resolve the server");
    conn_t c = {.fd = socket(AF_INET, SOCK_STREAM, 0), .ssl = NULL};
    if (c.fd < 0 || connect(c.fd, found->ai_addr, found->ai_addrlen) != 0) die("cannot connect");
    freeaddrinfo(found);
    nodelay(c.fd);
    if (ca) {
        SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
        if (!ctx || SSL_CTX_load_verify_locations(ctx, ca, NULL) != 1) die("cannot load the CA");
        SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
        c.ssl = SSL_new(ctx);
        SSL_set_fd(c.ssl, c.fd);
        struct in_addr ip; /* the certificate names 127.0.0.1 as an IP address, not a name */
        if (inet_pton(AF_INET, host, &ip) == 1
                ? X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(c.ssl), host) != 1
                : SSL_set1_host(c.ssl, host) != 1)
            die("cannot set the name to verify");
        if (SSL_connect(c.ssl) != 1) die("TLS handshake failed");
    }
    unsigned char *payload = malloc(size), *reply = malloc(size + 8), header[8];
    if (!payload || !reply) die("out of memory");
    for (size_t i = 0; i < size; i++) payload[i] = (unsigned char)(i * 2654435761u >> 24);
    for (int i = 0; i < 8; i++) header[i] = (unsigned char)((uint64_t)size >> (56 - 8 * i));
    double *seconds = malloc(sizeof(double) * (size_t)reps);
    for (int r = -warmup; r < reps; r++) {
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        put(&c, header, 8);
        put(&c, payload, size);
        if (!get(&c, reply, size + 8)) die("the server closed");
        clock_gettime(CLOCK_MONOTONIC, &t1);
        if (r >= 0) seconds[r] = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
    }
    if (memcmp(reply + 8, payload, size) != 0) die("the echo differs from what was sent");
    qsort(seconds, (size_t)reps, sizeof(double), compare);
    double median = reps % 2 ? seconds[reps / 2]
                             : (seconds[reps / 2 - 1] + seconds[reps / 2]) / 2;
    printf("{\"s\": %.9f}\n", median);
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 3 && strcmp(argv[1], "server") == 0)
        serve(argv[2], argc >= 5 ? argv[3] : NULL, argc >= 5 ? argv[4] : NULL);
    if (argc >= 7 && strcmp(argv[1], "client") == 0)
        return client(argv[2], argv[3], strtoull(argv[4], NULL, 10), atoi(argv[5]),
                      atoi(argv[6]), argc >= 8 ? argv[7] : NULL);
    fprintf(stderr, "usage: native_echo server HOST [CERT KEY] | "
                    "client HOST PORT SIZE REPS WARMUP [CA]\n");
    return 2;
}
