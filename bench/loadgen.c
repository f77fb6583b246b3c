/*
 * loadgen.c: a small, fast HTTP/1.1 load generator for a server on a Unix socket.
 *
 *   cc -O2 -Wall -Wextra -o loadgen loadgen.c
 *   loadgen --unix PATH --clients N [--duration SECONDS | --requests TOTAL]
 *           [--mode close|keepalive] [--request STRING] [--cpu K] [--warmup SECONDS]
 *           [--timeout SECONDS]
 *
 * One thread, one event loop (epoll on Linux, poll() elsewhere or with -DLOADGEN_POLL), N clients
 * each doing requests back to back. `close`: every request on a new connection (connect, write,
 * read the whole response, close), as the aem-token CLI does. `keepalive`: one connection per
 * client, one request outstanding on it (no pipelining); when the server closes it, the client
 * opens another and counts a reconnect.
 *
 * The client reads a response's head up to the blank line, its status and Content-Length, then
 * exactly that many body bytes (or, without Content-Length, the body up to EOF), into a fixed
 * 64 KiB buffer per connection. Success is a complete 200 response; anything else is an error of
 * one kind: connect, closed, timeout, malformed or "status NNN".
 *
 * Latency: from just before connect (close) or just before the first write (keepalive) to the
 * last byte of the response, on CLOCK_MONOTONIC; successful requests only.
 *
 * --duration: the measured window starts after --warmup seconds; what completes in it counts, and
 * the run stops at its end (requests still in flight then are dropped, not counted). --requests:
 * exactly TOTAL requests are taken by the clients (successes + errors == TOTAL); the first
 * min(N, TOTAL) connections are all opened and their requests written before the first read.
 *
 * Output: one JSON object on stdout; diagnostics on stderr. Exit 0 when it ran (even with
 * errors), 2 on bad usage, 1 if it could not run at all.
 */
#define _GNU_SOURCE
#define _DARWIN_C_SOURCE

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#ifdef __linux__
#include <sched.h>
#endif

#if defined(__linux__) && !defined(LOADGEN_POLL)
#define USE_EPOLL 1
#include <sys/epoll.h>
#else
#define USE_EPOLL 0
#include <poll.h>
#endif

#define BUF_SIZE 65536
#define BODY_KEEP 800 /* bytes of the first 200 body kept: 200 characters of up to 4 bytes */
#define BODY_CHARS 200
#define FOREVER 1e300

enum kind { E_CONNECT, E_CLOSED, E_TIMEOUT, E_MALFORMED, E_STATUS, N_KINDS };
static const char *const KIND_NAMES[N_KINDS] = {"connect", "closed", "timeout", "malformed",
                                                "status"};

enum state { S_IDLE, S_QUEUED, S_RETRY, S_CONNECTING, S_WRITING, S_READING };

struct conn {
    int fd;
    int state;
    int registered; /* the fd is in the event set, waiting for `want` */
    int want;       /* 1: readable, 2: writable */
    int reused;     /* keepalive: a response was already read on this connection */
    int started_write;
    int server_close; /* the response said Connection: close */
    size_t wpos, len, head_len, scanned;
    long long body_len; /* -1: up to EOF */
    int status;
    double t_start, deadline, retry_at, backoff;
    char *buf;
};

/* ---- settings */

static struct sockaddr_un g_addr;
static socklen_t g_addrlen;
static char *g_req;
static size_t g_req_len;
static int g_keepalive;
static int g_head; /* HEAD request: no body in the response */
static double g_timeout = 10.0;

/* ---- state */

static struct conn *g_conns;
static int g_nconns;
static int *g_queue, *g_queue2, g_nqueue;
static double g_next_scan;

static struct {
    int by_requests;
    long long remaining; /* --requests: still to be taken */
    double count_from;   /* completions from then on count */
    double end;          /* --duration: the end of the window */
    int active;          /* clients not idle */
} P;

static double *g_lat;
static size_t g_nlat, g_caplat;
static long long g_errors[N_KINDS];
static long long g_status_errors[1000];
static int g_first_errno[N_KINDS];
static long long g_reconnects;
static unsigned char g_body[BODY_KEEP];
static size_t g_body_len;
static int g_have_body;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void die(const char *what) {
    fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
    exit(1);
}

/* ---- the event set */

#if USE_EPOLL
static int g_ep;
static struct epoll_event *g_evs;

static void ev_init(void) {
    g_ep = epoll_create1(EPOLL_CLOEXEC);
    if (g_ep < 0) die("epoll_create1");
    g_evs = calloc((size_t)g_nconns, sizeof *g_evs);
    if (!g_evs) die("calloc");
}

static void ev_want(struct conn *c, int want) {
    struct epoll_event e;
    if (c->registered && c->want == want) return;
    memset(&e, 0, sizeof e);
    e.events = want == 1 ? EPOLLIN : EPOLLOUT;
    e.data.u32 = (uint32_t)(c - g_conns);
    if (epoll_ctl(g_ep, c->registered ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, c->fd, &e) != 0)
        die("epoll_ctl");
    c->registered = 1;
    c->want = want;
}

static void ev_drop(struct conn *c) { c->registered = 0; } /* close() takes it out of the set */

static void on_event(struct conn *c);

static void ev_wait(int timeout_ms) {
    int n = epoll_wait(g_ep, g_evs, g_nconns, timeout_ms);
    if (n < 0) {
        if (errno == EINTR) return;
        die("epoll_wait");
    }
    for (int i = 0; i < n; i++) on_event(&g_conns[g_evs[i].data.u32]);
}
#else
static struct pollfd *g_pfds;

static void ev_init(void) {
    g_pfds = calloc((size_t)g_nconns, sizeof *g_pfds);
    if (!g_pfds) die("calloc");
    for (int i = 0; i < g_nconns; i++) g_pfds[i].fd = -1;
}

static void ev_want(struct conn *c, int want) {
    struct pollfd *p = &g_pfds[c - g_conns];
    p->fd = c->fd;
    p->events = want == 1 ? POLLIN : POLLOUT;
    c->registered = 1;
    c->want = want;
}

static void ev_drop(struct conn *c) {
    g_pfds[c - g_conns].fd = -1;
    c->registered = 0;
}

static void on_event(struct conn *c);

static void ev_wait(int timeout_ms) {
    int n = poll(g_pfds, (nfds_t)g_nconns, timeout_ms);
    if (n < 0) {
        if (errno == EINTR) return;
        die("poll");
    }
    for (int i = 0; i < g_nconns && n > 0; i++) {
        if (g_pfds[i].fd >= 0 && g_pfds[i].revents) {
            n--;
            g_pfds[i].revents = 0;
            on_event(&g_conns[i]);
        }
    }
}
#endif

/* ---- clients */

static void start_request(struct conn *c);
static void open_conn(struct conn *c);
static void do_write(struct conn *c);

static void close_conn(struct conn *c) {
    if (c->fd >= 0) {
        ev_drop(c);
        close(c->fd);
        c->fd = -1;
    }
    c->reused = 0;
}

static int counting(double t) { return t >= P.count_from; }

static int take_next(double t) {
    if (P.by_requests) {
        if (P.remaining <= 0) return 0;
        P.remaining--;
        return 1;
    }
    return t < P.end;
}

/* The client's next request, if any: now (after a response) or from the queue (after an error,
   so that a connect failing at once cannot recurse). */
static void next(struct conn *c, double t, int keep_conn, int direct) {
    if (!keep_conn) close_conn(c);
    if (!take_next(t)) {
        close_conn(c);
        c->state = S_IDLE;
        P.active--;
        return;
    }
    if (g_keepalive && !keep_conn && counting(t)) g_reconnects++;
    if (direct) {
        start_request(c);
    } else {
        c->state = S_QUEUED;
        g_queue[g_nqueue++] = (int)(c - g_conns);
    }
}

static void fail(struct conn *c, enum kind kind, int err) {
    double t = now();
    if (counting(t)) {
        g_errors[kind]++;
        if (!g_first_errno[kind]) g_first_errno[kind] = err ? err : -1;
    }
    next(c, t, 0, 0);
}

static void capture_body(const struct conn *c) {
    size_t n = c->len - c->head_len;
    if (c->body_len >= 0 && (size_t)c->body_len < n) n = (size_t)c->body_len;
    if (n > BODY_KEEP) n = BODY_KEEP;
    memcpy(g_body, c->buf + c->head_len, n);
    g_body_len = n;
    g_have_body = 1;
}

static void push_latency(double x) {
    if (g_nlat == g_caplat) {
        size_t cap = g_caplat ? g_caplat * 2 : 65536;
        double *p = realloc(g_lat, cap * sizeof *p);
        if (!p) die("realloc");
        g_lat = p;
        g_caplat = cap;
    }
    g_lat[g_nlat++] = x;
}

static void complete(struct conn *c) {
    double t = now();
    size_t total = c->body_len >= 0 ? c->head_len + (size_t)c->body_len : c->len;
    if (c->status == 200) {
        if (!g_have_body) capture_body(c);
        if (counting(t)) push_latency(t - c->t_start);
    } else if (counting(t)) {
        g_errors[E_STATUS]++;
        g_status_errors[c->status]++;
    }
    c->reused = 1;
    next(c, t, g_keepalive && !c->server_close && c->body_len >= 0 && c->len == total, 1);
}

/* The server closed the connection (EOF, reset, EPIPE) before a byte of the response. */
static void peer_closed(struct conn *c, int err) {
    if (g_keepalive && c->reused && c->len == 0) {
        /* A kept-alive connection the server had closed: the same request on a new one. */
        close_conn(c);
        if (counting(now())) g_reconnects++;
        c->wpos = 0;
        open_conn(c);
        return;
    }
    fail(c, E_CLOSED, err);
}

static void schedule_retry(struct conn *c, double t) {
    close_conn(c);
    c->state = S_RETRY;
    c->retry_at = t + c->backoff;
    if (c->backoff < 0.02) c->backoff *= 2;
    if (c->retry_at < g_next_scan) g_next_scan = c->retry_at;
}

static int retryable_connect_errno(int err) {
#ifdef __APPLE__
    if (err == ECONNREFUSED) return 1; /* macOS: the listen backlog is full */
#endif
    return err == EAGAIN || err == EWOULDBLOCK;
}

static void open_conn(struct conn *c) {
    int fd;
#ifdef SOCK_NONBLOCK
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
#else
    fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd >= 0) {
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
        fcntl(fd, F_SETFD, FD_CLOEXEC);
    }
#endif
    if (fd < 0) {
        fail(c, E_CONNECT, errno);
        return;
    }
#ifdef SO_NOSIGPIPE
    {
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_NOSIGPIPE, &one, sizeof one);
    }
#endif
    c->fd = fd;
    c->reused = 0;
    if (connect(fd, (struct sockaddr *)&g_addr, g_addrlen) == 0) {
        c->state = S_WRITING;
        do_write(c);
        return;
    }
    if (errno == EINPROGRESS || errno == EINTR) {
        c->state = S_CONNECTING;
        ev_want(c, 2);
    } else if (retryable_connect_errno(errno)) {
        schedule_retry(c, now());
    } else {
        fail(c, E_CONNECT, errno);
    }
}

static void finish_connect(struct conn *c) {
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0) err = errno;
    if (err == 0) {
        c->state = S_WRITING;
        do_write(c);
    } else if (retryable_connect_errno(err)) {
        schedule_retry(c, now());
    } else {
        fail(c, E_CONNECT, err);
    }
}

static void start_request(struct conn *c) {
    c->len = c->head_len = c->scanned = c->wpos = 0;
    c->body_len = -1;
    c->status = 0;
    c->server_close = 0;
    c->started_write = 0;
    c->backoff = 0.001;
    c->t_start = now();
    c->deadline = c->t_start + g_timeout;
    if (c->fd < 0)
        open_conn(c);
    else
        do_write(c);
}

static void do_write(struct conn *c) {
    if (!c->started_write) {
        c->started_write = 1;
        if (g_keepalive) c->t_start = now();
    }
    for (;;) {
        ssize_t n = write(c->fd, g_req + c->wpos, g_req_len - c->wpos);
        if (n > 0) {
            c->wpos += (size_t)n;
            if (c->wpos < g_req_len) continue;
            c->state = S_READING;
            ev_want(c, 1);
            return;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            c->state = S_WRITING;
            ev_want(c, 2);
            return;
        }
        peer_closed(c, n < 0 ? errno : 0);
        return;
    }
}

static int header_is(const char *p, size_t n, const char *name) {
    size_t k = strlen(name);
    return n == k && strncasecmp(p, name, k) == 0;
}

static int contains_ci(const char *p, size_t n, const char *word) {
    size_t k = strlen(word);
    for (size_t i = 0; i + k <= n; i++)
        if (strncasecmp(p + i, word, k) == 0) return 1;
    return 0;
}

/* 1: a complete response; 0: more bytes needed; -1: malformed (or too large). */
static int parse(struct conn *c) {
    if (!c->head_len) {
        size_t i = c->scanned > 3 ? c->scanned - 3 : 0;
        const char *b = c->buf;
        for (; i + 4 <= c->len; i++)
            if (b[i] == '\r' && b[i + 1] == '\n' && b[i + 2] == '\r' && b[i + 3] == '\n') break;
        if (i + 4 > c->len) {
            c->scanned = c->len;
            return 0;
        }
        c->head_len = i + 4;
        /* HTTP/1.x NNN */
        if (c->head_len < 16 || strncmp(b, "HTTP/1.", 7) != 0 || b[8] != ' ') return -1;
        for (int k = 9; k < 12; k++)
            if (b[k] < '0' || b[k] > '9') return -1;
        if (b[12] != ' ' && b[12] != '\r') return -1;
        c->status = (b[9] - '0') * 100 + (b[10] - '0') * 10 + (b[11] - '0');
        if (c->status < 200) return -1; /* interim responses are not expected here */
        long long cl = -1;
        const char *line = (const char *)memchr(b, '\n', c->head_len) + 1;
        const char *end = b + c->head_len - 2; /* the final empty line */
        while (line < end) {
            const char *eol = (const char *)memchr(line, '\n', (size_t)(end - line + 1));
            if (!eol || eol == line || eol[-1] != '\r') return -1;
            const char *colon = (const char *)memchr(line, ':', (size_t)(eol - line));
            if (!colon) return -1;
            const char *v = colon + 1, *ve = eol - 1;
            while (v < ve && (*v == ' ' || *v == '\t')) v++;
            while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t')) ve--;
            size_t name_len = (size_t)(colon - line), vn = (size_t)(ve - v);
            if (header_is(line, name_len, "content-length")) {
                long long x = 0;
                if (vn == 0 || vn > 15) return -1;
                for (size_t k = 0; k < vn; k++) {
                    if (v[k] < '0' || v[k] > '9') return -1;
                    x = x * 10 + (v[k] - '0');
                }
                if (cl >= 0 && cl != x) return -1;
                cl = x;
            } else if (header_is(line, name_len, "transfer-encoding")) {
                if (!header_is(v, vn, "identity")) return -1; /* chunked is not supported */
            } else if (header_is(line, name_len, "connection")) {
                if (contains_ci(v, vn, "close")) c->server_close = 1;
            }
            line = eol + 1;
        }
        c->body_len = (g_head || c->status == 204 || c->status == 304) ? 0 : cl;
        if (c->body_len >= 0 && c->head_len + (size_t)c->body_len > BUF_SIZE) return -1;
    }
    if (c->body_len < 0) return 0; /* up to EOF */
    size_t total = c->head_len + (size_t)c->body_len;
    if (c->len < total) return 0;
    if (c->len > total && g_keepalive) return -1; /* bytes no request asked for */
    return 1;
}

static void do_read(struct conn *c) {
    for (;;) {
        ssize_t n = read(c->fd, c->buf + c->len, BUF_SIZE - c->len);
        if (n > 0) {
            c->len += (size_t)n;
            break;
        }
        if (n == 0) {
            if (c->head_len && c->body_len < 0) { /* a body delimited by the close */
                c->server_close = 1;
                complete(c);
            } else {
                peer_closed(c, 0);
            }
            return;
        }
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return;
        peer_closed(c, errno);
        return;
    }
    int r = parse(c);
    if (r > 0)
        complete(c);
    else if (r < 0 || c->len == BUF_SIZE)
        fail(c, E_MALFORMED, 0);
}

static void on_event(struct conn *c) {
    switch (c->state) {
    case S_CONNECTING: finish_connect(c); break;
    case S_WRITING: do_write(c); break;
    case S_READING: do_read(c); break;
    default: break;
    }
}

/* Timeouts and connect retries: every few milliseconds, and at the earliest retry. */
static void scan(double t) {
    g_next_scan = t + 0.005;
    for (int i = 0; i < g_nconns; i++) {
        struct conn *c = &g_conns[i];
        if (c->state < S_RETRY) continue;
        if (t >= c->deadline) {
            int connecting = c->state == S_RETRY || c->state == S_CONNECTING;
            close_conn(c);
            fail(c, connecting ? E_CONNECT : E_TIMEOUT, connecting ? EAGAIN : ETIMEDOUT);
        } else if (c->state == S_RETRY) {
            if (t >= c->retry_at) {
                open_conn(c);
            } else if (c->retry_at < g_next_scan) {
                g_next_scan = c->retry_at;
            }
        }
    }
}

/* Runs one phase with min(clients, requests) clients; returns the end of its window. */
static double run_phase(int clients) {
    g_nqueue = 0;
    g_next_scan = 0;
    P.active = 0;
    for (int i = 0; i < clients; i++) {
        if (!take_next(now())) break;
        P.active++;
        start_request(&g_conns[i]); /* connect + write, all of them before the first read */
    }
    for (;;) {
        if (g_nqueue) { /* only those queued so far: a client failing at once waits a turn */
            int n = g_nqueue, *q = g_queue;
            g_queue = g_queue2;
            g_queue2 = q;
            g_nqueue = 0;
            for (int i = 0; i < n; i++) start_request(&g_conns[q[i]]);
        }
        double t = now();
        if (P.active == 0 || (!P.by_requests && t >= P.end)) {
            for (int i = 0; i < g_nconns; i++) {
                close_conn(&g_conns[i]);
                g_conns[i].state = S_IDLE;
            }
            return t;
        }
        if (t >= g_next_scan) {
            scan(t);
            continue;
        }
        double until = g_next_scan < P.end ? g_next_scan : P.end;
        int ms = g_nqueue ? 0 : (int)((until - t) * 1000.0) + 1;
        ev_wait(ms);
    }
}

/* ---- output */

static size_t utf8_len(const unsigned char *s, size_t n) {
    unsigned char c = s[0];
    size_t k;
    unsigned char lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) k = 2;
    else if (c >= 0xE0 && c <= 0xEF) k = 3;
    else if (c >= 0xF0 && c <= 0xF4) k = 4;
    else return 0;
    if (c == 0xE0) lo = 0xA0;
    if (c == 0xED) hi = 0x9F;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;
    if (n < k || s[1] < lo || s[1] > hi) return 0;
    for (size_t i = 2; i < k; i++)
        if (s[i] < 0x80 || s[i] > 0xBF) return 0;
    return k;
}

static void json_string(const unsigned char *s, size_t n, size_t max_chars) {
    putchar('"');
    for (size_t i = 0, chars = 0; i < n && chars < max_chars; chars++) {
        unsigned char ch = s[i];
        if (ch >= 0x80) {
            size_t k = utf8_len(s + i, n - i);
            if (k) fwrite(s + i, 1, k, stdout);
            else fputs("\\ufffd", stdout);
            i += k ? k : 1;
            continue;
        }
        i++;
        if (ch == '"') fputs("\\\"", stdout);
        else if (ch == '\\') fputs("\\\\", stdout);
        else if (ch == '\n') fputs("\\n", stdout);
        else if (ch == '\r') fputs("\\r", stdout);
        else if (ch == '\t') fputs("\\t", stdout);
        else if (ch < 0x20) printf("\\u%04x", ch);
        else putchar(ch);
    }
    putchar('"');
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void print_ms(const char *name, double seconds, int have) {
    if (have) printf(",\"%s\":%.3f", name, seconds * 1e3);
    else printf(",\"%s\":null", name);
}

static void report(int clients, double seconds) {
    long long errors = 0;
    double sum = 0;
    for (int k = 0; k < N_KINDS; k++) errors += g_errors[k];
    if (g_nlat) qsort(g_lat, g_nlat, sizeof *g_lat, cmp_double);
    for (size_t i = 0; i < g_nlat; i++) sum += g_lat[i];
    printf("{\"mode\":\"%s\",\"clients\":%d,\"requests\":%zu,\"seconds\":%.3f,\"rps\":%.1f",
           g_keepalive ? "keepalive" : "close", clients, g_nlat, seconds,
           seconds > 0 ? (double)g_nlat / seconds : 0.0);
    const double qs[3] = {0.50, 0.90, 0.99};
    const char *names[3] = {"p50_ms", "p90_ms", "p99_ms"};
    for (int i = 0; i < 3; i++)
        print_ms(names[i], g_nlat ? g_lat[(size_t)(qs[i] * (double)(g_nlat - 1) + 0.5)] : 0,
                 g_nlat > 0);
    print_ms("max_ms", g_nlat ? g_lat[g_nlat - 1] : 0, g_nlat > 0);
    print_ms("mean_ms", g_nlat ? sum / (double)g_nlat : 0, g_nlat > 0);
    printf(",\"errors\":%lld,\"error_kinds\":{", errors);
    const char *sep = "";
    for (int k = 0; k < E_STATUS; k++) {
        if (!g_errors[k]) continue;
        printf("%s\"%s\":%lld", sep, KIND_NAMES[k], g_errors[k]);
        sep = ",";
    }
    for (int s = 0; s < 1000; s++) {
        if (!g_status_errors[s]) continue;
        printf("%s\"status %03d\":%lld", sep, s, g_status_errors[s]);
        sep = ",";
    }
    printf("},\"reconnects\":%lld,\"first_body\":", g_reconnects);
    if (g_have_body) json_string(g_body, g_body_len, BODY_CHARS);
    else fputs("null", stdout);
    fputs("}\n", stdout);
    fflush(stdout);
    for (int k = 0; k < E_STATUS; k++)
        if (g_errors[k])
            fprintf(stderr, "loadgen: %lld %s errors, the first: %s\n", g_errors[k], KIND_NAMES[k],
                    g_first_errno[k] > 0 ? strerror(g_first_errno[k]) : "(no errno)");
}

/* ---- command line */

static const char USAGE[] =
    "usage: loadgen --unix PATH --clients N [--duration SECONDS | --requests TOTAL]\n"
    "               [--mode close|keepalive] [--request STRING] [--cpu K]\n"
    "               [--warmup SECONDS] [--timeout SECONDS]\n";

static void usage_error(const char *fmt, const char *arg) {
    fputs("loadgen: ", stderr);
    fprintf(stderr, fmt, arg);
    fputs(" (try --help)\n", stderr);
    exit(2);
}

static double parse_seconds(const char *opt, const char *s, int zero_ok) {
    char *end;
    errno = 0;
    double x = strtod(s, &end);
    if (errno || end == s || *end || !(x >= 0) || (!zero_ok && x == 0) || x > 1e7)
        usage_error(zero_ok ? "%s wants a number of seconds >= 0" : "%s wants seconds > 0", opt);
    return x;
}

static long long parse_count(const char *opt, const char *s, long long lo, long long hi) {
    char *end;
    errno = 0;
    long long x = strtoll(s, &end, 10);
    if (errno || end == s || *end || x < lo || x > hi) usage_error("%s: bad number", opt);
    return x;
}

/* The --request text with \r, \n and \\ interpreted. */
static void set_request(const char *s) {
    size_t n = strlen(s), j = 0;
    g_req = malloc(n + 1);
    if (!g_req) die("malloc");
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '\\' && i + 1 < n && (s[i + 1] == 'r' || s[i + 1] == 'n' || s[i + 1] == '\\')) {
            i++;
            g_req[j++] = s[i] == 'r' ? '\r' : s[i] == 'n' ? '\n' : '\\';
        } else {
            g_req[j++] = s[i];
        }
    }
    g_req_len = j;
    if (j == 0) usage_error("%s must not be empty", "--request");
    g_head = j >= 5 && memcmp(g_req, "HEAD ", 5) == 0;
}

static void raise_nofile(long long need) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur == RLIM_INFINITY) return;
    if ((long long)rl.rlim_cur >= need) return;
    rlim_t old = rl.rlim_cur;
    rl.rlim_cur = rl.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0) {
        rl.rlim_cur = (rlim_t)need; /* macOS refuses RLIM_INFINITY and anything over OPEN_MAX */
        if (rl.rlim_max != RLIM_INFINITY && rl.rlim_cur > rl.rlim_max) rl.rlim_cur = rl.rlim_max;
        if (setrlimit(RLIMIT_NOFILE, &rl) != 0) rl.rlim_cur = old;
    }
    if ((long long)rl.rlim_cur < need)
        fprintf(stderr, "loadgen: warning: RLIMIT_NOFILE is %llu, %lld wanted\n",
                (unsigned long long)rl.rlim_cur, need);
}

int main(int argc, char **argv) {
    const char *path = NULL, *mode = "close";
    const char *request = "GET /v1/token HTTP/1.1\\r\\nHost: localhost\\r\\n"
                          "Accept: text/plain\\r\\n\\r\\n";
    long long clients = 0, requests = 0, cpu = -1;
    double duration = 0, warmup = 0;

    for (int i = 1; i < argc; i++) {
        const char *opt = argv[i], *val = NULL;
        char name[32];
        if (strcmp(opt, "-h") == 0 || strcmp(opt, "--help") == 0) {
            fputs(USAGE, stdout);
            return 0;
        }
        const char *eq = strchr(opt, '=');
        if (strncmp(opt, "--", 2) == 0 && eq && (size_t)(eq - opt) < sizeof name) {
            memcpy(name, opt, (size_t)(eq - opt));
            name[eq - opt] = 0;
            opt = name;
            val = eq + 1;
        } else if (i + 1 < argc) {
            val = argv[++i];
        } else {
            usage_error("%s: a value is missing or the option is unknown", opt);
        }
        if (strcmp(opt, "--unix") == 0) path = val;
        else if (strcmp(opt, "--clients") == 0) clients = parse_count(opt, val, 1, 1000000);
        else if (strcmp(opt, "--duration") == 0) duration = parse_seconds(opt, val, 0);
        else if (strcmp(opt, "--requests") == 0) requests = parse_count(opt, val, 1, 1LL << 50);
        else if (strcmp(opt, "--mode") == 0) mode = val;
        else if (strcmp(opt, "--request") == 0) request = val;
        else if (strcmp(opt, "--cpu") == 0) cpu = parse_count(opt, val, 0, 1 << 20);
        else if (strcmp(opt, "--warmup") == 0) warmup = parse_seconds(opt, val, 1);
        else if (strcmp(opt, "--timeout") == 0) g_timeout = parse_seconds(opt, val, 0);
        else usage_error("unknown option %s", opt);
    }
    if (!path) usage_error("%s is required", "--unix PATH");
    if (!clients) usage_error("%s is required", "--clients N");
    if (duration && requests) usage_error("%s", "--duration and --requests exclude each other");
    if (!duration && !requests) duration = 5.0;
    if (strcmp(mode, "close") == 0) g_keepalive = 0;
    else if (strcmp(mode, "keepalive") == 0) g_keepalive = 1;
    else usage_error("--mode is close or keepalive, not %s", mode);
    if (strlen(path) >= sizeof g_addr.sun_path) usage_error("the socket path is too long: %s", path);
    set_request(request);

    memset(&g_addr, 0, sizeof g_addr);
    g_addr.sun_family = AF_UNIX;
    memcpy(g_addr.sun_path, path, strlen(path) + 1);
    g_addrlen = (socklen_t)sizeof g_addr;

#ifdef __linux__
    if (cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        if (cpu >= CPU_SETSIZE) usage_error("%s: no such CPU", "--cpu");
        CPU_SET((size_t)cpu, &set);
        if (sched_setaffinity(0, sizeof set, &set) != 0)
            fprintf(stderr, "loadgen: warning: --cpu %lld: %s\n", cpu, strerror(errno));
    }
#else
    (void)cpu;
#endif
    signal(SIGPIPE, SIG_IGN);
    raise_nofile(clients + 16);

    g_nconns = (int)(requests && requests < clients ? requests : clients);
    g_conns = calloc((size_t)g_nconns, sizeof *g_conns);
    g_queue = calloc((size_t)g_nconns, sizeof *g_queue);
    g_queue2 = calloc((size_t)g_nconns, sizeof *g_queue2);
    if (!g_conns || !g_queue || !g_queue2) die("calloc");
    for (int i = 0; i < g_nconns; i++) {
        g_conns[i].fd = -1;
        g_conns[i].buf = malloc(BUF_SIZE);
        if (!g_conns[i].buf) die("malloc");
    }
    ev_init();

    double t0 = now(), start, stop;
    if (requests) {
        if (warmup > 0) { /* back to back for the warm-up, nothing counted; then the burst */
            P.by_requests = 0;
            P.count_from = FOREVER;
            P.end = t0 + warmup;
            run_phase(g_nconns);
        }
        P.by_requests = 1;
        P.remaining = requests;
        P.end = FOREVER;
        start = P.count_from = now();
        stop = run_phase(g_nconns);
    } else {
        P.by_requests = 0;
        start = P.count_from = t0 + warmup;
        P.end = start + duration;
        stop = run_phase(g_nconns);
        if (stop < start) stop = start;
    }
    report((int)clients, stop - start);
    return 0;
}
