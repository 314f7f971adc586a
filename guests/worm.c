/*
 * worm: a harmless stand-in for a Code-Red-style scanning worm, for vhostni's tests.
 *
 *     worm [-m MODE] [-n COUNT] [-r RATE_PER_S] [-p PORT] [-s SEED] [-w WAIT_S] [-d DNS] [-T] [-S SRC]
 *          PREFIX/LEN
 *     worm -m lookup -d DNS [-T] [-p PORT] NAME
 *
 * Scanning styles (-m), each making COUNT attempts, RATE per second (-r 0.1 is a slow scanner: one new
 * address every 10 s), to distinct random addresses inside PREFIX/LEN:
 *   tcp      (default) non-blocking TCP connections without any DNS lookup: exactly the behaviour the Code-Red
 *            scanner watches for.  Nothing is ever sent on a connection; each socket stays open (so the guest's
 *            TCP retransmits its SYN, like a real worm's blocking connect) until it connects, fails, or the run
 *            ends WAIT_S seconds after the last attempt (default 0, at most 600).  With more than ~64k sockets
 *            open (or the descriptor limit), the oldest is closed first;
 *   udp      one UDP datagram to PORT per address (Slammer: 376 bytes, sent once, never retried);
 *   icmp     one ICMP echo request per address (a ping sweep; raw socket, needs root);
 *   ptr      the evasion of the Siphon paper's section 5.3: for each random address, a reverse (PTR) lookup at
 *            the DNS server DNS, a forward (A) lookup of the name it returned, then a TCP connection as in tcp
 *            to the address that came back, so every address looks "resolved";
 *   synbomb  TCP SYNs to PORT on the one host PREFIX/32 from source address SRC (-S; the guest's own, but
 *            not configured on its interface, so its kernel drops the SYN-ACKs instead of answering them with
 *            RSTs), random source ports and ISNs, through a raw socket: handshakes never completed (COUNT may
 *            exceed the prefix's size here).
 * And one normal client, for the tests' good traffic:
 *   lookup   resolve NAME (type A) at DNS (over TCP with -T), then connect to PORT on the answer:
 *            prints "lookup NAME ADDR" and "connected 1 ADDR:PORT" (or "failed 1 ADDR:PORT ERROR"); exit 0 if
 *            connected.
 *
 * Safety: there is no default target; PREFIX/LEN is required and every address is inside it.  Prefixes shorter
 * than /8 are refused.  The test network is private and isolated.  The network and broadcast addresses are
 * skipped (except in a /31 or /32, where every address may be chosen).  COUNT may not exceed the
 * number of addresses available.
 *
 * Output, one line each, flushed:
 *     worm: seed S target PREFIX/LEN port P count N rate R
 *     attempt I ADDR:PORT                    for every connect() (I from 1)
 *     connected I ADDR:PORT | refused I ADDR:PORT | failed I ADDR:PORT ERROR   (tcp and ptr)
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
#include <netinet/ip.h>
#include <netinet/ip_icmp.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
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

enum mode { M_TCP, M_UDP, M_ICMP, M_PTR, M_SYNBOMB, M_LOOKUP };

static uint16_t csum16(const void *data, size_t len, uint32_t sum)
{
    const uint8_t *p = data;
    for (; len > 1; p += 2, len -= 2)
        sum += (uint32_t)(p[0] << 8 | p[1]);
    if (len)
        sum += (uint32_t)(p[0] << 8);
    while (sum >> 16)
        sum = (sum & 0xFFFF) + (sum >> 16);
    return (uint16_t)~sum;
}

/* ---- a minimal DNS client: one question, the first answer of the wanted type; every read bounds-checked */

/* Appends NAME in wire form at q[*pos]; -1 if it does not fit. */
static int put_name(uint8_t *q, size_t cap, size_t *pos, const char *name)
{
    const char *p = name;
    while (*p) {
        const char *dot = strchr(p, '.');
        size_t l = dot ? (size_t)(dot - p) : strlen(p);
        if (l == 0 || l > 63 || *pos + 1 + l >= cap)
            return -1;
        q[(*pos)++] = (uint8_t)l;
        memcpy(q + *pos, p, l);
        *pos += l;
        p += l + (dot ? 1 : 0);
    }
    if (*pos + 5 > cap)
        return -1;
    q[(*pos)++] = 0;
    return 0;
}

/* Reads a (possibly compressed) name at msg[*pos] into out; moves *pos past it.  Pointers must go backwards. */
static int get_name(const uint8_t *msg, size_t len, size_t *pos, char *out, size_t outsz)
{
    size_t p = *pos, o = 0, floor = *pos;
    int jumped = 0, hops = 0;
    for (;;) {
        if (p >= len)
            return -1;
        uint8_t l = msg[p];
        if ((l & 0xC0) == 0xC0) {
            if (p + 1 >= len || ++hops > 32)
                return -1;
            size_t t = (size_t)(l & 0x3F) << 8 | msg[p + 1];
            if (t >= floor)
                return -1;
            if (!jumped)
                *pos = p + 2;
            jumped = 1;
            p = floor = t;
            continue;
        }
        if (l & 0xC0)
            return -1;
        if (l == 0) {
            if (!jumped)
                *pos = p + 1;
            if (o > 0)
                o--;                    /* no trailing dot */
            out[o] = '\0';
            return 0;
        }
        if (p + 1 + l > len || o + l + 2 > outsz)
            return -1;
        memcpy(out + o, msg + p + 1, l);
        o += l;
        out[o++] = '.';
        p += 1 + l;
    }
}

/* Asks DNS server `server` (UDP, or TCP if tcp) for NAME of type qtype; the first answer record of that type
 * goes to addr (A) or name_out (PTR).  0 on success. */
static int dns_ask(uint32_t server, int tcp, const char *name, uint16_t qtype, uint32_t *addr, char *name_out,
                   size_t name_sz)
{
    uint8_t q[300], r[4096];
    uint16_t id = (uint16_t)rng_next();
    memset(q, 0, 12);
    q[0] = (uint8_t)(id >> 8);
    q[1] = (uint8_t)id;
    q[2] = 0x01;                        /* RD */
    q[5] = 1;                           /* one question */
    size_t pos = 12;
    if (put_name(q, sizeof(q), &pos, name))
        return -1;
    q[pos++] = (uint8_t)(qtype >> 8);
    q[pos++] = (uint8_t)qtype;
    q[pos++] = 0;
    q[pos++] = 1;                       /* IN */
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(53), .sin_addr.s_addr = htonl(server)};
    int fd = socket(AF_INET, (tcp ? SOCK_STREAM : SOCK_DGRAM) | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct timeval tv = {.tv_sec = 3};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    ssize_t n = -1;
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0) {
        if (tcp) {
            uint8_t hdr[2] = {(uint8_t)(pos >> 8), (uint8_t)pos};
            if (send(fd, hdr, 2, MSG_MORE) == 2 && send(fd, q, pos, 0) == (ssize_t)pos) {
                size_t got = 0, want = 2;
                uint8_t lenb[2];
                while (got < want) {    /* the length, then the message: each may come in pieces */
                    ssize_t k = recv(fd, got < 2 ? lenb + got : r + got - 2, got < 2 ? 2 - got : want - got, 0);
                    if (k <= 0)
                        break;
                    got += (size_t)k;
                    if (got == 2 && want == 2) {
                        want = 2 + ((size_t)lenb[0] << 8 | lenb[1]);
                        if (want - 2 > sizeof(r))
                            break;
                    }
                }
                n = got == want && want > 2 ? (ssize_t)(want - 2) : -1;
            }
        } else if (send(fd, q, pos, 0) == (ssize_t)pos) {
            n = recv(fd, r, sizeof(r), 0);
        }
    }
    close(fd);
    if (n < 12 || r[0] != q[0] || r[1] != q[1] || !(r[2] & 0x80) || (r[3] & 0x0F))
        return -1;
    size_t len = (size_t)n, p = 12;
    unsigned qd = (unsigned)(r[4] << 8 | r[5]), an = (unsigned)(r[6] << 8 | r[7]);
    char tmp[300];
    for (unsigned i = 0; i < qd; i++) {
        if (get_name(r, len, &p, tmp, sizeof(tmp)) || p + 4 > len)
            return -1;
        p += 4;
    }
    for (unsigned i = 0; i < an; i++) {
        if (get_name(r, len, &p, tmp, sizeof(tmp)) || p + 10 > len)
            return -1;
        uint16_t type = (uint16_t)(r[p] << 8 | r[p + 1]);
        size_t rdlen = (size_t)(r[p + 8] << 8 | r[p + 9]);
        p += 10;
        if (p + rdlen > len)
            return -1;
        if (type == qtype && qtype == 1 && rdlen == 4) {
            *addr = (uint32_t)r[p] << 24 | (uint32_t)r[p + 1] << 16 | (uint32_t)r[p + 2] << 8 | r[p + 3];
            return 0;
        }
        if (type == qtype && qtype == 12) {
            size_t np = p;
            return get_name(r, p + rdlen, &np, name_out, name_sz);
        }
        p += rdlen;
    }
    return -1;
}

/* A SYN from src:sport to dst:dport with sequence number seq, IP header included (for a raw socket). */
static size_t build_syn(uint8_t *pkt, uint32_t src, uint32_t dst, uint16_t sport, uint16_t dport, uint32_t seq)
{
    memset(pkt, 0, 40);
    pkt[0] = 0x45;
    pkt[3] = 40;
    pkt[6] = 0x40;                      /* DF */
    pkt[8] = 64;
    pkt[9] = IPPROTO_TCP;
    uint32_t s = htonl(src), d = htonl(dst);
    memcpy(pkt + 12, &s, 4);
    memcpy(pkt + 16, &d, 4);
    uint16_t c = csum16(pkt, 20, 0);
    pkt[10] = (uint8_t)(c >> 8);
    pkt[11] = (uint8_t)c;
    uint8_t *t = pkt + 20;
    t[0] = (uint8_t)(sport >> 8);
    t[1] = (uint8_t)sport;
    t[2] = (uint8_t)(dport >> 8);
    t[3] = (uint8_t)dport;
    t[4] = (uint8_t)(seq >> 24);
    t[5] = (uint8_t)(seq >> 16);
    t[6] = (uint8_t)(seq >> 8);
    t[7] = (uint8_t)seq;
    t[12] = 5 << 4;
    t[13] = 0x02;                       /* SYN */
    t[14] = 0xFF;
    t[15] = 0xFF;
    uint8_t pseudo[12];
    memcpy(pseudo, pkt + 12, 8);
    pseudo[8] = 0;
    pseudo[9] = IPPROTO_TCP;
    pseudo[10] = 0;
    pseudo[11] = 20;
    uint32_t sum = 0;
    for (int i = 0; i < 12; i += 2)
        sum += (uint32_t)(pseudo[i] << 8 | pseudo[i + 1]);
    c = csum16(t, 20, sum);
    t[16] = (uint8_t)(c >> 8);
    t[17] = (uint8_t)c;
    return 40;
}

static void usage(void)
{
    fprintf(stderr, "usage: worm [-m tcp|udp|icmp|ptr|synbomb] [-n COUNT] [-r RATE_PER_S] [-p PORT] [-s SEED]\n"
                    "            [-w WAIT_S] [-d DNS] [-T] [-S SRC] PREFIX/LEN\n"
                    "       worm -m lookup -d DNS [-T] [-p PORT] NAME\n"
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
    int have_seed = 0, opt, dns_tcp = 0, have_port = 0;
    enum mode mode = M_TCP;
    uint32_t dns_server = 0, spoof_src = 0;

    while ((opt = getopt(argc, argv, "m:n:r:p:s:w:d:TS:h")) != -1) {
        switch (opt) {
        case 'm': {
            static const char *names[] = {"tcp", "udp", "icmp", "ptr", "synbomb", "lookup"};
            int found = -1;
            for (int i = 0; i < 6; i++)
                if (!strcmp(optarg, names[i]))
                    found = i;
            if (found < 0) {
                fprintf(stderr, "worm: bad mode %s\n", optarg);
                return 2;
            }
            mode = (enum mode)found;
            break;
        }
        case 'd':
        case 'S': {
            struct in_addr a;
            if (inet_pton(AF_INET, optarg, &a) != 1) {
                fprintf(stderr, "worm: bad address %s\n", optarg);
                return 2;
            }
            *(opt == 'd' ? &dns_server : &spoof_src) = ntohl(a.s_addr);
            break;
        }
        case 'T':
            dns_tcp = 1;
            break;
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
            have_port = 1;
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
    if ((mode == M_PTR || mode == M_LOOKUP) && !dns_server) {
        fprintf(stderr, "worm: mode %s needs -d DNS\n", mode == M_PTR ? "ptr" : "lookup");
        return 2;
    }
    if (mode == M_SYNBOMB && !spoof_src) {
        fprintf(stderr, "worm: mode synbomb needs -S SRC\n");
        return 2;
    }
    if (mode == M_UDP && !have_port)
        port = 1434;
    if (mode == M_LOOKUP) {
        rng_state = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
        uint32_t addr;
        char nm[300];
        if (dns_ask(dns_server, dns_tcp, argv[optind], 1, &addr, nm, sizeof(nm))) {
            printf("lookup %s failed\n", argv[optind]);
            return 1;
        }
        struct in_addr ia = {.s_addr = htonl(addr)};
        printf("lookup %s %s\n", argv[optind], inet_ntoa(ia));
        fflush(stdout);
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        struct timeval tv = {.tv_sec = 5};
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
        struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port), .sin_addr = ia};
        if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0) {
            print_addr("connected", 1, addr, (int)port, NULL);
            return 0;
        }
        print_addr("failed", 1, addr, (int)port, strerror(errno));
        return 1;
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
    if (mode != M_SYNBOMB && (uint64_t)count > hosts) {
        fprintf(stderr, "worm: %ld attempts but only %" PRIu64 " addresses in %s\n", count, hosts, argv[optind]);
        return 2;
    }
    if (!have_seed)
        seed = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
    rng_state = seed;

    /* One bit per address of the prefix (at most 2^24 bits = 2 MiB for a /8): distinct targets. */
    uint8_t *used = calloc((size_t)((size + 7) / 8), 1);
    int raw = -1, dgram = -1;
    if (mode == M_ICMP || mode == M_SYNBOMB) {
        raw = socket(AF_INET, SOCK_RAW | SOCK_CLOEXEC, mode == M_ICMP ? IPPROTO_ICMP : IPPROTO_RAW);
        if (raw < 0) {
            perror("worm: raw socket");
            return 1;
        }
    } else if (mode == M_UDP) {
        dgram = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
        if (dgram < 0) {
            perror("worm: socket");
            return 1;
        }
    }
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
            } while (mode != M_SYNBOMB && (used[h >> 3] & (1u << (h & 7))));
            used[h >> 3] |= (uint8_t)(1u << (h & 7));
            uint32_t addr = net | (uint32_t)h;
            if (mode == M_UDP || mode == M_ICMP || mode == M_SYNBOMB) {
                sent++;
                print_addr("attempt", sent, addr, mode == M_ICMP ? 0 : (int)port, NULL);
                struct sockaddr_in da = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(addr),
                                         .sin_port = mode == M_UDP ? htons((uint16_t)port) : 0};
                uint8_t pkt[376];
                size_t plen;
                int sfd = raw;
                if (mode == M_UDP) {
                    memset(pkt, 'A', sizeof(pkt));
                    pkt[0] = 0x04;              /* Slammer's first byte: an SSRS request */
                    plen = sizeof(pkt);
                    sfd = dgram;
                } else if (mode == M_ICMP) {
                    memset(pkt, 0, 64);
                    pkt[0] = ICMP_ECHO;
                    pkt[4] = (uint8_t)(getpid() >> 8);
                    pkt[5] = (uint8_t)getpid();
                    pkt[6] = (uint8_t)(sent >> 8);
                    pkt[7] = (uint8_t)sent;
                    uint16_t c = csum16(pkt, 64, 0);
                    pkt[2] = (uint8_t)(c >> 8);
                    pkt[3] = (uint8_t)c;
                    plen = 64;
                } else {
                    plen = build_syn(pkt, spoof_src, addr, (uint16_t)(1024 + rng_next() % 60000), (uint16_t)port,
                                     (uint32_t)rng_next());
                }
                if (sendto(sfd, pkt, plen, 0, (struct sockaddr *)&da, sizeof(da)) < 0) {
                    failed++;
                    print_addr("failed", sent, addr, (int)port, strerror(errno));
                }
                if (sent == count) {
                    printf("sent %ld attempts in %.3f s\n", sent, now_s() - start);
                    fflush(stdout);
                    end_time = now_s() + wait_s;
                }
                continue;
            }
            if (mode == M_PTR) {
                /* reverse-resolve the random address, forward-resolve the name: the address is "resolved" */
                char rev[64], nm[300];
                uint32_t back = 0;
                snprintf(rev, sizeof(rev), "%u.%u.%u.%u.in-addr.arpa", addr & 255, (addr >> 8) & 255,
                         (addr >> 16) & 255, addr >> 24);
                if (dns_ask(dns_server, dns_tcp, rev, 12, &back, nm, sizeof(nm)) ||
                    dns_ask(dns_server, dns_tcp, nm, 1, &back, NULL, 0)) {
                    sent++;
                    failed++;
                    print_addr("failed", sent, addr, (int)port, "lookup");
                    if (sent == count) {
                        printf("sent %ld attempts in %.3f s\n", sent, now_s() - start);
                        end_time = now_s() + wait_s;
                    }
                    continue;
                }
                addr = back;
            }
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
