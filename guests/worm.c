/*
 * worm: a harmless stand-in for a Code-Red-style scanning worm, for vhostni's tests.
 *
 *     worm [-n COUNT] [-r RATE_PER_S] [-p PORT] [-s SEED] [-w WAIT_S] PREFIX/LEN
 *
 * Opens COUNT non-blocking TCP connections, RATE per second, to distinct random addresses inside PREFIX/LEN,
 * without any DNS lookup: exactly the behaviour the Code-Red scanner watches for.  Nothing is ever sent on a
 * connection; each socket stays open (so the guest's TCP retransmits its SYN, like a real worm's blocking
 * connect) until it connects, fails, or the run ends WAIT_S seconds after the last attempt (default 0, at
 * most 600).  With more than ~64k sockets open (or the descriptor limit), the oldest is closed first.
 *
 * Safety: there is no default target; PREFIX/LEN is required and every address is inside it.  Prefixes shorter
 * than /8 are refused.  The test network is private and isolated.  The network and broadcast addresses are
 * skipped (except in a /31 or /32, where every address may be chosen).  COUNT may not exceed the
 * number of addresses available.
 *
 * Output, one line each, flushed:
 *     worm: seed S target PREFIX/LEN port P count N rate R
 *     attempt I ADDR:PORT                    for every connect() (I from 1)
 *     connected I ADDR:PORT | refused I ADDR:PORT | failed I ADDR:PORT ERROR
 *     sent N attempts in T s                 when the last attempt has been made
 *     done: connected C refused R failed F pending P
 * "refused" means a RST came back, so the SYN got through; "pending" sockets never heard back.
 *
 * Exit status: 0 on a completed run, 2 on bad arguments, 1 on a system error.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_COUNT 1000000L
#define MAX_RATE 100000.0
#define MAX_WAIT 600.0

struct conn {
    int fd;
    long index;        /* attempt number, from 1 */
    uint32_t addr;     /* host order */
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* splitmix64: the same sequence for the same seed on every libc. */
static uint64_t rng_state;
static uint64_t rng_next(void)
{
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static void usage(void)
{
    fprintf(stderr, "usage: worm [-n COUNT] [-r RATE_PER_S] [-p PORT] [-s SEED] [-w WAIT_S] PREFIX/LEN\n"
                    "  COUNT 1..%ld (default 20), RATE 0<r<=%g per second (default 10), PORT (default 80),\n"
                    "  WAIT_S seconds to keep sockets open after the last attempt (default 0); LEN 8..32\n",
            MAX_COUNT, MAX_RATE);
}

static int parse_long(const char *s, long lo, long hi, long *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi)
        return -1;
    *out = v;
    return 0;
}

static int parse_double(const char *s, double lo, double hi, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= lo && v <= hi))
        return -1;
    *out = v;
    return 0;
}

/* PREFIX/LEN -> network (host order) and length; the host bits of PREFIX must be zero. */
static int parse_prefix(const char *arg, uint32_t *net, int *len)
{
    char buf[64];
    const char *slash = strchr(arg, '/');
    if (!slash || (size_t)(slash - arg) >= sizeof(buf))
        return -1;
    memcpy(buf, arg, (size_t)(slash - arg));
    buf[slash - arg] = '\0';
    struct in_addr a;
    if (inet_pton(AF_INET, buf, &a) != 1)
        return -1;
    long l;
    if (parse_long(slash + 1, 0, 32, &l))
        return -1;
    *len = (int)l;
    *net = ntohl(a.s_addr);
    return 0;
}

static void print_addr(const char *what, long index, uint32_t addr, int port, const char *extra)
{
    struct in_addr a = {.s_addr = htonl(addr)};
    char s[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &a, s, sizeof(s));
    if (extra)
        printf("%s %ld %s:%d %s\n", what, index, s, port, extra);
    else
        printf("%s %ld %s:%d\n", what, index, s, port);
    fflush(stdout);
}

int main(int argc, char **argv)
{
    long count = 20, port = 80;
    double rate = 10.0, wait_s = 0.0;
    uint64_t seed = 0;
    int have_seed = 0, opt;

    while ((opt = getopt(argc, argv, "n:r:p:s:w:h")) != -1) {
        switch (opt) {
        case 'n':
            if (parse_long(optarg, 1, MAX_COUNT, &count)) {
                fprintf(stderr, "worm: bad count %s\n", optarg);
                return 2;
            }
            break;
        case 'r':
            if (parse_double(optarg, 1e-6, MAX_RATE, &rate)) {
                fprintf(stderr, "worm: bad rate %s\n", optarg);
                return 2;
            }
            break;
        case 'p':
            if (parse_long(optarg, 1, 65535, &port)) {
                fprintf(stderr, "worm: bad port %s\n", optarg);
                return 2;
            }
            break;
        case 's': {
            char *end;
            errno = 0;
            unsigned long long v = strtoull(optarg, &end, 0);
            if (errno || end == optarg || *end) {
                fprintf(stderr, "worm: bad seed %s\n", optarg);
                return 2;
            }
            seed = v;
            have_seed = 1;
            break;
        }
        case 'w':
            if (parse_double(optarg, 0, MAX_WAIT, &wait_s)) {
                fprintf(stderr, "worm: bad wait %s\n", optarg);
                return 2;
            }
            break;
        default:
            usage();
            return opt == 'h' ? 0 : 2;
        }
    }
    if (optind != argc - 1) {
        usage();
        return 2;
    }
    uint32_t net;
    int len;
    if (parse_prefix(argv[optind], &net, &len)) {
        fprintf(stderr, "worm: bad prefix %s (want A.B.C.D/LEN)\n", argv[optind]);
        return 2;
    }
    if (len < 8) {
        fprintf(stderr, "worm: refusing prefix /%d: shorter than /8 (too wide to be a private test network)\n", len);
        return 2;
    }
    uint32_t mask = len == 32 ? 0xFFFFFFFFu : ~(0xFFFFFFFFu >> len);
    if (net & ~mask) {
        fprintf(stderr, "worm: %s has host bits set\n", argv[optind]);
        return 2;
    }
    /* Host numbers first..last inside the prefix. */
    uint64_t size = (uint64_t)1 << (32 - len);
    uint64_t first = 0, last = size - 1;
    if (len <= 30) {
        first = 1;
        last = size - 2;
    }
    uint64_t hosts = last - first + 1;
    if ((uint64_t)count > hosts) {
        fprintf(stderr, "worm: %ld attempts but only %" PRIu64 " addresses in %s\n", count, hosts, argv[optind]);
        return 2;
    }
    if (!have_seed)
        seed = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
    rng_state = seed;

    /* One bit per address of the prefix (at most 2^24 bits = 2 MiB for a /8): distinct targets. */
    uint8_t *used = calloc((size_t)((size + 7) / 8), 1);
    /* Enough descriptors for every socket we keep open (raise the soft limit as far as allowed). */
    struct rlimit rl;
    long max_open = 1000;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rlim_t want = (rlim_t)count + 16;
        if (rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < want) {
            rl.rlim_cur = (rl.rlim_max != RLIM_INFINITY && rl.rlim_max < want) ? rl.rlim_max : want;
            setrlimit(RLIMIT_NOFILE, &rl);
            getrlimit(RLIMIT_NOFILE, &rl);
        }
        max_open = rl.rlim_cur == RLIM_INFINITY || rl.rlim_cur > 65536 + 16 ? 65536 : (long)rl.rlim_cur - 16;
    }
    if (max_open < 1)
        max_open = 1;
    if (max_open > count)
        max_open = count;
    struct conn *open_c = calloc((size_t)max_open, sizeof(*open_c));
    struct pollfd *pfd = calloc((size_t)max_open, sizeof(*pfd));
    if (!used || !open_c || !pfd) {
        fprintf(stderr, "worm: out of memory\n");
        return 1;
    }

    {
        struct in_addr a = {.s_addr = htonl(net)};
        char s[INET_ADDRSTRLEN];
        inet_ntop(AF_INET, &a, s, sizeof(s));
        printf("worm: seed %" PRIu64 " target %s/%d port %ld count %ld rate %g\n", seed, s, len, port, count, rate);
        fflush(stdout);
    }

    long n_open = 0, sent = 0, connected = 0, refused = 0, failed = 0;
    double start = now_s(), end_time = 0;
    for (;;) {
        double t = now_s();
        /* Next attempt due at start + sent/rate; after the last one, wait until end_time. */
        if (sent < count && t >= start + (double)sent / rate) {
            uint64_t h;
            do {
                h = first + rng_next() % hosts;
            } while (used[h >> 3] & (1u << (h & 7)));
            used[h >> 3] |= (uint8_t)(1u << (h & 7));
            uint32_t addr = net | (uint32_t)h;
            if (n_open == max_open) {   /* out of descriptors: give up on the oldest */
                close(open_c[0].fd);
                memmove(open_c, open_c + 1, (size_t)(n_open - 1) * sizeof(*open_c));
                n_open--;
            }
            sent++;
            print_addr("attempt", sent, addr, (int)port, NULL);
            int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
            if (fd < 0) {
                perror("worm: socket");
                return 1;
            }
            struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                                     .sin_addr.s_addr = htonl(addr)};
            if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0) {
                connected++;
                print_addr("connected", sent, addr, (int)port, NULL);
                close(fd);
            } else if (errno == EINPROGRESS) {
                open_c[n_open++] = (struct conn){.fd = fd, .index = sent, .addr = addr};
            } else if (errno == ECONNREFUSED) {
                refused++;
                print_addr("refused", sent, addr, (int)port, NULL);
                close(fd);
            } else {
                failed++;
                print_addr("failed", sent, addr, (int)port, strerror(errno));
                close(fd);
            }
            if (sent == count) {
                double took = now_s() - start;
                printf("sent %ld attempts in %.3f s\n", sent, took);
                fflush(stdout);
                end_time = now_s() + wait_s;
            }
            continue;
        }
        if (sent == count && (n_open == 0 || t >= end_time))
            break;
        double until = sent < count ? start + (double)sent / rate : end_time;
        int timeout_ms = (int)((until - t) * 1000.0) + 1;
        if (timeout_ms < 0)
            timeout_ms = 0;
        for (long i = 0; i < n_open; i++)
            pfd[i] = (struct pollfd){.fd = open_c[i].fd, .events = POLLOUT};
        int r = poll(pfd, (nfds_t)n_open, timeout_ms);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            perror("worm: poll");
            return 1;
        }
        if (r == 0)
            continue;
        long keep = 0;
        for (long i = 0; i < n_open; i++) {
            if (!pfd[i].revents) {
                open_c[keep++] = open_c[i];
                continue;
            }
            int err = 0;
            socklen_t elen = sizeof(err);
            if (getsockopt(open_c[i].fd, SOL_SOCKET, SO_ERROR, &err, &elen) < 0)
                err = errno;
            if (err == 0) {
                connected++;
                print_addr("connected", open_c[i].index, open_c[i].addr, (int)port, NULL);
            } else if (err == ECONNREFUSED) {
                refused++;
                print_addr("refused", open_c[i].index, open_c[i].addr, (int)port, NULL);
            } else {
                failed++;
                print_addr("failed", open_c[i].index, open_c[i].addr, (int)port, strerror(err));
            }
            close(open_c[i].fd);
        }
        n_open = keep;
    }
    for (long i = 0; i < n_open; i++)
        close(open_c[i].fd);
    printf("done: connected %ld refused %ld failed %ld pending %ld\n", connected, refused, failed, n_open);
    fflush(stdout);
    free(used);
    free(open_c);
    free(pfd);
    return 0;
}
