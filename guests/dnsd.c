/*
 * dnsd: a minimal authoritative DNS server over UDP, for vhostni's test guests.
 *
 *     dnsd [-p PORT] [-b ADDR] [-t] [-r ZONE] NAME=IPV4 [NAME=IPV4 ...]
 *
 * Answers standard queries (opcode QUERY, one question, class IN or ANY) for the names given: type A (or ANY)
 * gets every address listed for the name (TTL 300, authoritative), another type or class for a known name
 * gets an empty NOERROR answer, an unknown name NXDOMAIN.  Names match case-insensitively, with or without a trailing dot.
 * A query it cannot parse gets FORMERR, another opcode NOTIMP; a message too short for a header, or a response
 * (QR=1), gets nothing, so two servers can never ping-pong.  EDNS OPT records in a query are ignored and not
 * echoed; answers longer than 512 bytes are truncated (TC=1) at a record boundary.
 *
 * With -t it also answers over TCP (RFC 1035 4.2.2: a two-byte length, then the message; one connection at a
 * time, queries until the client closes, 2 s of silence ends it).  With -r ZONE it synthesises a reverse zone
 * for any IPv4 address, as ISPs do: a PTR query for d.c.b.a.in-addr.arpa gets h-a-b-c-d.ZONE, and an A query
 * for h-a-b-c-d.ZONE gets a.b.c.d (what the worm's PTR-laundering style needs).
 *
 * Every read of the query is bounds-checked; the query is never trusted for a length.  It logs one line per
 * query to stdout: "query NAME TYPE from ADDR:PORT -> RCODE ANSWERS".  Defaults: port 53, all addresses.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#define MAX_NAME 255        /* presentation form, without the trailing dot */
#define MAX_RECORDS 256
#define UDP_MAX 512         /* classic DNS over UDP: replies never exceed it */
#define TTL 300

#define T_A 1
#define T_PTR 12
#define T_ANY 255
#define C_IN 1
#define C_ANY 255
#define RC_NOERROR 0
#define RC_FORMERR 1
#define RC_NXDOMAIN 3
#define RC_NOTIMP 4

struct record {
    char name[MAX_NAME + 1];    /* lower case, no trailing dot */
    uint8_t addr[4];
};

static struct record records[MAX_RECORDS];
static int n_records;
static const char *rev_zone;    /* -r */

/* Lower-cases and strips one trailing dot; rejects empty labels, labels over 63 and names over 253 chars. */
static int normalize_name(const char *in, char *out, size_t outsz)
{
    size_t n = strlen(in);
    if (n > 0 && in[n - 1] == '.')
        n--;
    if (n == 0 || n > 253 || n >= outsz)
        return -1;
    size_t label = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)in[i];
        if (c == '.') {
            if (label == 0)
                return -1;
            label = 0;
        } else if (++label > 63 || c <= 0x20 || c >= 0x7f) {
            return -1;
        }
        out[i] = (char)tolower(c);
    }
    if (label == 0)
        return -1;
    out[n] = '\0';
    return 0;
}

/*
 * Reads the uncompressed question name at msg[*pos] (queries do not use compression; a pointer is FORMERR)
 * into out as lower-case text.  A label byte that is '.' or outside printable ASCII cannot occur in a
 * configured name: it is shown as '?' and the function returns 1 (the name exists nowhere: NXDOMAIN).
 * Returns 0 (or 1) and advances *pos past the name, or -1 if the name is malformed.
 */
static int read_qname(const uint8_t *msg, size_t len, size_t *pos, char *out, size_t outsz)
{
    size_t p = *pos, o = 0, wire = 0;
    int odd = 0;
    for (;;) {
        if (p >= len)
            return -1;
        uint8_t l = msg[p++];
        if (l & 0xC0)
            return -1;
        wire += (size_t)l + 1;
        if (wire > 255)
            return -1;
        if (l == 0)
            break;
        if (l > len - p)
            return -1;
        if (o != 0) {
            if (o + 1 >= outsz)
                return -1;
            out[o++] = '.';
        }
        for (uint8_t i = 0; i < l; i++) {
            unsigned char c = msg[p + i];
            if (o + 1 >= outsz)
                return -1;
            if (c <= 0x20 || c >= 0x7f || c == '.') {
                odd = 1;
                c = '?';
            }
            out[o++] = (char)tolower(c);
        }
        p += l;
    }
    if (o + 1 > outsz)
        return -1;
    out[o] = '\0';
    *pos = p;
    return odd;
}

static void put16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static uint16_t get16(const uint8_t *p)
{
    return (uint16_t)((p[0] << 8) | p[1]);
}

/*
 * Builds the reply to query q (qlen bytes) in r (at most UDP_MAX bytes).  Returns its length, or 0 for no
 * reply.  name/qtype/answers are filled in for the log line.
 */
static size_t answer(const uint8_t *q, size_t qlen, uint8_t *r, char *name, size_t namesz, int *qtype_out,
                     int *rcode_out, int *answers_out)
{
    *qtype_out = -1;
    *rcode_out = -1;
    *answers_out = 0;
    strcpy(name, "?");
    if (qlen < 12)
        return 0;
    uint16_t flags = get16(q + 2);
    if (flags & 0x8000)                 /* a response: never answer one */
        return 0;
    uint16_t qdcount = get16(q + 4);
    int opcode = (flags >> 11) & 0xF;

    /* Header of the reply: same ID, QR=1, same opcode and RD, AA=1 for our zone. */
    memset(r, 0, 12);
    memcpy(r, q, 2);
    uint16_t rflags = (uint16_t)(0x8000 | (opcode << 11) | (flags & 0x0100));
    size_t rlen = 12;

    int rcode;
    size_t pos = 12;
    uint16_t qtype = 0, qclass = 0;
    int odd = 0;
    if (opcode != 0) {
        rcode = RC_NOTIMP;
    } else if (qdcount != 1 || (odd = read_qname(q, qlen, &pos, name, namesz)) < 0 || qlen - pos < 4) {
        rcode = RC_FORMERR;
        strcpy(name, "?");
    } else {
        qtype = get16(q + pos);
        qclass = get16(q + pos + 2);
        pos += 4;
        *qtype_out = qtype;
        /* Echo the question (it fits: it came in a query and is at most 255 + 4 bytes). */
        size_t qsize = pos - 12;
        if (12 + qsize > UDP_MAX) {
            rcode = RC_FORMERR;
        } else {
            memcpy(r + 12, q + 12, qsize);
            put16(r + 4, 1);
            rlen = 12 + qsize;
            int known = 0, n = 0;
            unsigned o[4];
            char tail[MAX_NAME + 2];
            int k = 0;
            if (rev_zone && !odd && qtype == T_PTR &&
                sscanf(name, "%u.%u.%u.%u.in-addr.arpa%n", &o[3], &o[2], &o[1], &o[0], &k) == 4 &&
                name[k] == '\0' && o[0] < 256 && o[1] < 256 && o[2] < 256 && o[3] < 256) {
                char target[MAX_NAME + 2];
                int tl = snprintf(target, sizeof(target), "h-%u-%u-%u-%u.%s", o[0], o[1], o[2], o[3], rev_zone);
                uint8_t wire[MAX_NAME + 2];
                size_t wl = 0;
                for (const char *lp = target; tl > 0 && *lp;) {     /* presentation -> wire form */
                    const char *dot = strchr(lp, '.');
                    size_t ll = dot ? (size_t)(dot - lp) : strlen(lp);
                    if (ll == 0 || ll > 63 || wl + ll + 2 > sizeof(wire))
                        break;
                    wire[wl++] = (uint8_t)ll;
                    memcpy(wire + wl, lp, ll);
                    wl += ll;
                    lp += ll + (dot ? 1 : 0);
                }
                wire[wl++] = 0;
                known = 1;
                if (rlen + 12 + wl <= UDP_MAX) {
                    uint8_t *a = r + rlen;
                    put16(a, 0xC00C);
                    put16(a + 2, T_PTR);
                    put16(a + 4, C_IN);
                    put16(a + 6, 0);
                    put16(a + 8, TTL);
                    put16(a + 10, (uint16_t)wl);
                    memcpy(a + 12, wire, wl);
                    rlen += 12 + wl;
                    n++;
                }
            } else if (rev_zone && !odd &&
                       sscanf(name, "h-%u-%u-%u-%u.%257s", &o[0], &o[1], &o[2], &o[3], tail) == 5 &&
                       !strcmp(tail, rev_zone) && o[0] < 256 && o[1] < 256 && o[2] < 256 && o[3] < 256) {
                known = 1;
                if ((qtype == T_A || qtype == T_ANY) && rlen + 16 <= UDP_MAX) {
                    uint8_t *a = r + rlen;
                    put16(a, 0xC00C);
                    put16(a + 2, T_A);
                    put16(a + 4, C_IN);
                    put16(a + 6, 0);
                    put16(a + 8, TTL);
                    put16(a + 10, 4);
                    for (int b = 0; b < 4; b++)
                        a[12 + b] = (uint8_t)o[b];
                    rlen += 16;
                    n++;
                }
            }
            for (int i = 0; i < n_records && !odd; i++) {
                if (strcmp(records[i].name, name) != 0)
                    continue;
                known = 1;
                if ((qtype != T_A && qtype != T_ANY) || (qclass != C_IN && qclass != C_ANY))
                    continue;
                if (rlen + 16 > UDP_MAX) {
                    rflags |= 0x0200;   /* TC: the rest does not fit */
                    break;
                }
                uint8_t *a = r + rlen;
                put16(a, 0xC00C);       /* the name: a pointer to the question */
                put16(a + 2, T_A);
                put16(a + 4, C_IN);
                put16(a + 6, (uint16_t)(TTL >> 16));
                put16(a + 8, (uint16_t)(TTL & 0xFFFF));
                put16(a + 10, 4);
                memcpy(a + 12, records[i].addr, 4);
                rlen += 16;
                n++;
            }
            put16(r + 6, (uint16_t)n);
            *answers_out = n;
            rflags |= 0x0400;           /* AA: we are the authority for every name we answer */
            rcode = known ? RC_NOERROR : RC_NXDOMAIN;
        }
    }
    put16(r + 2, (uint16_t)(rflags | rcode));
    *rcode_out = rcode;
    return rlen;
}

static const char *rcode_name(int rc)
{
    switch (rc) {
    case RC_NOERROR: return "NOERROR";
    case RC_FORMERR: return "FORMERR";
    case RC_NXDOMAIN: return "NXDOMAIN";
    case RC_NOTIMP: return "NOTIMP";
    default: return "none";
    }
}

static void usage(void)
{
    fprintf(stderr, "usage: dnsd [-p PORT] [-b ADDR] [-t] [-r ZONE] NAME=IPV4 [NAME=IPV4 ...]\n");
}

int main(int argc, char **argv)
{
    long port = 53;
    const char *bind_addr = "0.0.0.0";
    int opt, tcp = 0;
    while ((opt = getopt(argc, argv, "p:b:tr:h")) != -1) {
        switch (opt) {
        case 't':
            tcp = 1;
            break;
        case 'r':
            if (strlen(optarg) > 200) {
                fprintf(stderr, "dnsd: reverse zone too long\n");
                return 2;
            }
            rev_zone = optarg;
            break;
        case 'p': {
            char *end;
            errno = 0;
            port = strtol(optarg, &end, 10);
            if (errno || end == optarg || *end || port < 1 || port > 65535) {
                fprintf(stderr, "dnsd: bad port %s\n", optarg);
                return 2;
            }
            break;
        }
        case 'b':
            bind_addr = optarg;
            break;
        default:
            usage();
            return opt == 'h' ? 0 : 2;
        }
    }
    if (optind >= argc && !rev_zone) {
        usage();
        return 2;
    }
    for (int i = optind; i < argc; i++) {
        if (n_records == MAX_RECORDS) {
            fprintf(stderr, "dnsd: at most %d records\n", MAX_RECORDS);
            return 2;
        }
        char buf[MAX_NAME + 2];
        const char *eq = strrchr(argv[i], '=');
        if (!eq || (size_t)(eq - argv[i]) >= sizeof(buf)) {
            fprintf(stderr, "dnsd: bad record %s (want NAME=IPV4)\n", argv[i]);
            return 2;
        }
        memcpy(buf, argv[i], (size_t)(eq - argv[i]));
        buf[eq - argv[i]] = '\0';
        struct record *rec = &records[n_records];
        struct in_addr a;
        if (normalize_name(buf, rec->name, sizeof(rec->name)) < 0 || inet_pton(AF_INET, eq + 1, &a) != 1) {
            fprintf(stderr, "dnsd: bad record %s (want NAME=IPV4)\n", argv[i]);
            return 2;
        }
        memcpy(rec->addr, &a.s_addr, 4);
        n_records++;
    }

    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        perror("dnsd: socket");
        return 1;
    }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, bind_addr, &sa.sin_addr) != 1) {
        fprintf(stderr, "dnsd: bad bind address %s\n", bind_addr);
        return 2;
    }
    if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        perror("dnsd: bind");
        return 1;
    }
    int lfd = -1;
    if (tcp) {
        lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (lfd < 0 || setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0 ||
            bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(lfd, 16) < 0) {
            perror("dnsd: tcp");
            return 1;
        }
    }
    printf("dnsd: serving %d records on %s:%ld%s\n", n_records, bind_addr, port, tcp ? " (udp and tcp)" : "");
    fflush(stdout);

    for (;;) {
        uint8_t q[65536], r[UDP_MAX];
        struct sockaddr_in from;
        socklen_t fromlen = sizeof(from);
        if (lfd >= 0) {
            struct pollfd pf[2] = {{.fd = fd, .events = POLLIN}, {.fd = lfd, .events = POLLIN}};
            if (poll(pf, 2, -1) < 0)
                continue;
            if (pf[1].revents & POLLIN) {
                int c = accept4(lfd, (struct sockaddr *)&from, &fromlen, SOCK_CLOEXEC);
                if (c < 0)
                    continue;
                struct timeval tv = {.tv_sec = 2};
                setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
                setsockopt(c, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
                for (;;) {          /* queries on this connection until it closes or goes quiet */
                    uint8_t lb[2];
                    if (recv(c, lb, 2, MSG_WAITALL) != 2)
                        break;
                    size_t ql = (size_t)(lb[0] << 8 | lb[1]);
                    if (ql == 0 || recv(c, q, ql, MSG_WAITALL) != (ssize_t)ql)
                        break;
                    char name[MAX_NAME + 2];
                    int qtype, rcode, answers;
                    size_t rlen = answer(q, ql, r, name, sizeof(name), &qtype, &rcode, &answers);
                    char fs[INET_ADDRSTRLEN];
                    inet_ntop(AF_INET, &from.sin_addr, fs, sizeof(fs));
                    printf("query %s %d from %s:%d tcp -> %s %d\n", name, qtype, fs, ntohs(from.sin_port),
                           rcode_name(rcode), answers);
                    fflush(stdout);
                    if (rlen == 0)
                        break;
                    uint8_t out[2 + UDP_MAX];
                    out[0] = (uint8_t)(rlen >> 8);
                    out[1] = (uint8_t)rlen;
                    memcpy(out + 2, r, rlen);
                    /* in two pieces, so a reader must put the message together across segments */
                    if (send(c, out, 3, 0) != 3 || send(c, out + 3, rlen - 1, 0) != (ssize_t)(rlen - 1))
                        break;
                }
                close(c);
                continue;
            }
            if (!(pf[0].revents & POLLIN))
                continue;
            fromlen = sizeof(from);
        }
        ssize_t n = recvfrom(fd, q, sizeof(q), 0, (struct sockaddr *)&from, &fromlen);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("dnsd: recvfrom");
            return 1;
        }
        char name[MAX_NAME + 2];
        int qtype, rcode, answers;
        size_t rlen = answer(q, (size_t)n, r, name, sizeof(name), &qtype, &rcode, &answers);
        char fs[INET_ADDRSTRLEN];
        inet_ntop(AF_INET, &from.sin_addr, fs, sizeof(fs));
        printf("query %s %d from %s:%d -> %s %d\n", name, qtype, fs, ntohs(from.sin_port), rcode_name(rcode),
               answers);
        fflush(stdout);
        if (rlen > 0)
            sendto(fd, r, rlen, 0, (struct sockaddr *)&from, fromlen);
    }
}
