/*
 * minimail: a minimal SMTP + POP3 server and clients, for vhostni's test guests.
 *
 *     minimail serve DIR                      SMTP on 25 and POP3 on 110; messages in DIR/new
 *     minimail send ADDR FILE [FROM [TO]]     send FILE as one message over SMTP (port 25)
 *     minimail fetch ADDR N OUT               POP3 (port 110): RETR message N into OUT
 *
 * The server forks a child per connection.  SMTP: HELO/EHLO, MAIL, RCPT, DATA, RSET, NOOP, QUIT;
 * the message is dot-unstuffed and stored byte for byte (as sent, CRLFs included) in DIR/tmp, then
 * renamed into DIR/new once its final "." arrived, so an interrupted DATA leaves nothing in new/.
 * POP3: USER, PASS, STAT, LIST, RETR, DELE, NOOP, RSET, QUIT over the files of DIR/new in name
 * order (at most MAX_MSGS); RETR dot-stuffs and ends with ".\r\n".  Commands longer than
 * MAX_LINE are refused and the connection closed; messages longer than MAX_MSG are refused.
 *
 * The clients print what went wrong (including "Connection reset by peer") and exit 1 on any
 * failure; "minimail send" prints "sent" and "minimail fetch" prints "fetched BYTES" on success.  The
 * file is sent as it is (it should use CRLF line ends); a final CRLF is added if it lacks one.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_LINE 1024
#define MAX_MSG (16L * 1024 * 1024)
#define MAX_MSGS 1000
#define IO_TIMEOUT_MS 60000

/* ---- buffered line reader ---------------------------------------------------------------- */

struct conn {
    int fd;
    char buf[8192];
    size_t len, pos;
};

/* read up to cap-1 bytes of one line (through '\n' when it fits); *complete tells whether the
 * line ended.  Returns the length, 0 at EOF, -1 on error. */
static ssize_t read_line(struct conn *c, char *out, size_t cap, int *complete)
{
    size_t n = 0;
    *complete = 0;
    while (n + 1 < cap) {
        if (c->pos == c->len) {
            struct pollfd p = {.fd = c->fd, .events = POLLIN};
            int r = poll(&p, 1, IO_TIMEOUT_MS);
            if (r == 0) {
                errno = ETIMEDOUT;
                return -1;
            }
            if (r < 0) {
                if (errno == EINTR)
                    continue;
                return -1;
            }
            ssize_t got = read(c->fd, c->buf, sizeof c->buf);
            if (got < 0) {
                if (errno == EINTR)
                    continue;
                return -1;
            }
            if (got == 0)
                break;
            c->len = (size_t)got;
            c->pos = 0;
        }
        char ch = c->buf[c->pos++];
        out[n++] = ch;
        if (ch == '\n') {
            *complete = 1;
            break;
        }
    }
    out[n] = '\0';
    return (ssize_t)n;
}

static int write_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int say(int fd, const char *s)
{
    return write_all(fd, s, strlen(s));
}

static void chomp(char *s)
{
    size_t n = strlen(s);
    while (n > 0 && (s[n - 1] == '\n' || s[n - 1] == '\r'))
        s[--n] = '\0';
}

static int verb(const char *line, const char *v)
{
    size_t n = strlen(v);
    return strncasecmp(line, v, n) == 0 && (line[n] == '\0' || line[n] == ' ' || line[n] == ':');
}

/* ---- SMTP server --------------------------------------------------------------------------- */

static const char *g_dir;

/* DIR/SUB/NAME into out; -1 if it does not fit */
static int mkpath(char *out, size_t cap, const char *sub, const char *name)
{
    int n = snprintf(out, cap, "%s/%s%s%s", g_dir, sub, name[0] ? "/" : "", name);
    return n < 0 || (size_t)n >= cap ? -1 : 0;
}

/* DATA: read dot-stuffed lines until "." into a file; 0 stored, 1 refused (too big), -1 I/O */
static int smtp_data(struct conn *c, int *stored)
{
    static unsigned long counter;
    char tmp[4096], fin[4096], line[MAX_LINE + 2];
    snprintf(tmp, sizeof tmp, "%s/tmp/%ld.%d.%lu", g_dir, (long)time(NULL), (int)getpid(), ++counter);
    snprintf(fin, sizeof fin, "%s/new/%ld.%d.%lu", g_dir, (long)time(NULL), (int)getpid(), counter);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL, 0644);
    long total = 0;
    int bol = 1, too_big = 0, complete;
    *stored = 0;
    for (;;) {
        ssize_t n = read_line(c, line, sizeof line, &complete);
        if (n <= 0) {
            if (fd >= 0) {
                close(fd);
                unlink(tmp);
            }
            return -1;
        }
        const char *p = line;
        size_t len = (size_t)n;
        if (bol && line[0] == '.') {
            if (strcmp(line, ".\r\n") == 0 || strcmp(line, ".\n") == 0)
                break;
            p++;
            len--;
        }
        bol = complete;
        total += (long)len;
        if (total > MAX_MSG)
            too_big = 1;
        if (fd >= 0 && !too_big && write_all(fd, p, len) < 0) {
            close(fd);
            unlink(tmp);
            fd = -1;
        }
    }
    if (fd < 0)
        return -1;
    if (close(fd) < 0 || too_big) {
        unlink(tmp);
        return too_big ? 1 : -1;
    }
    if (rename(tmp, fin) < 0) {
        unlink(tmp);
        return -1;
    }
    *stored = 1;
    return 0;
}

static void smtp_session(int fd)
{
    struct conn c = {.fd = fd};
    char line[MAX_LINE + 2];
    int complete, have_from = 0, have_rcpt = 0;
    say(fd, "220 mail.test ESMTP test server\r\n");
    for (;;) {
        ssize_t n = read_line(&c, line, sizeof line, &complete);
        if (n <= 0)
            return;
        if (!complete) {
            say(fd, "500 line too long\r\n");
            return;
        }
        chomp(line);
        if (verb(line, "HELO") || verb(line, "EHLO")) {
            have_from = have_rcpt = 0;
            say(fd, "250 mail.test\r\n");
        } else if (verb(line, "MAIL")) {
            have_from = 1;
            have_rcpt = 0;
            say(fd, "250 ok\r\n");
        } else if (verb(line, "RCPT")) {
            if (!have_from) {
                say(fd, "503 MAIL first\r\n");
                continue;
            }
            have_rcpt = 1;
            say(fd, "250 ok\r\n");
        } else if (verb(line, "DATA")) {
            if (!have_rcpt) {
                say(fd, "503 RCPT first\r\n");
                continue;
            }
            say(fd, "354 end with .\r\n");
            int stored;
            int r = smtp_data(&c, &stored);
            if (r < 0) {
                say(fd, "451 local error\r\n");
                return;
            }
            say(fd, r == 1 ? "552 message too big\r\n" : "250 stored\r\n");
            have_from = have_rcpt = 0;
        } else if (verb(line, "RSET")) {
            have_from = have_rcpt = 0;
            say(fd, "250 ok\r\n");
        } else if (verb(line, "NOOP")) {
            say(fd, "250 ok\r\n");
        } else if (verb(line, "QUIT")) {
            say(fd, "221 bye\r\n");
            return;
        } else {
            say(fd, "500 unknown command\r\n");
        }
    }
}

/* ---- POP3 server --------------------------------------------------------------------------- */

struct msg {
    char name[256];
    long size;
    int deleted;
};

static int cmp_msg(const void *a, const void *b)
{
    return strcmp(((const struct msg *)a)->name, ((const struct msg *)b)->name);
}

static int load_msgs(struct msg *m, int cap)
{
    char path[4096];
    DIR *d = mkpath(path, sizeof path, "new", "") == 0 ? opendir(path) : NULL;
    if (!d)
        return 0;
    int n = 0;
    struct dirent *e;
    while (n < cap && (e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.' || strlen(e->d_name) >= sizeof m[n].name)
            continue;
        struct stat st;
        if (mkpath(path, sizeof path, "new", e->d_name) < 0 || stat(path, &st) < 0 || !S_ISREG(st.st_mode))
            continue;
        snprintf(m[n].name, sizeof m[n].name, "%s", e->d_name);
        m[n].size = (long)st.st_size;
        m[n].deleted = 0;
        n++;
    }
    closedir(d);
    qsort(m, (size_t)n, sizeof *m, cmp_msg);
    return n;
}

/* the message number argument of a command: 1..n, not deleted; else 0 */
static int msg_arg(const char *line, size_t vlen, const struct msg *m, int n)
{
    const char *p = line + vlen;
    while (*p == ' ')
        p++;
    if (*p < '0' || *p > '9')
        return 0;
    char *end;
    errno = 0;
    long k = strtol(p, &end, 10);
    if (errno || *end != '\0' || k < 1 || k > n || m[k - 1].deleted)
        return 0;
    return (int)k;
}

static int pop3_retr(int fd, const struct msg *m)
{
    char path[4096], out[2 * 8192 + 4];
    int in = mkpath(path, sizeof path, "new", m->name) == 0 ? open(path, O_RDONLY) : -1;
    if (in < 0)
        return say(fd, "-ERR cannot open\r\n");
    if (say(fd, "+OK message follows\r\n") < 0) {
        close(in);
        return -1;
    }
    char buf[8192];
    int bol = 1;
    char last = '\n';
    ssize_t got;
    while ((got = read(in, buf, sizeof buf)) > 0) {
        size_t o = 0;
        for (ssize_t i = 0; i < got; i++) {
            if (bol && buf[i] == '.')
                out[o++] = '.';
            out[o++] = buf[i];
            bol = buf[i] == '\n';
            last = buf[i];
        }
        if (write_all(fd, out, o) < 0) {
            close(in);
            return -1;
        }
    }
    close(in);
    if (got < 0)
        return -1;
    return say(fd, last == '\n' ? ".\r\n" : "\r\n.\r\n");
}

static void pop3_session(int fd)
{
    static struct msg m[MAX_MSGS];
    int n = load_msgs(m, MAX_MSGS);
    struct conn c = {.fd = fd};
    char line[MAX_LINE + 2], reply[512];
    int complete;
    say(fd, "+OK POP3 test server ready\r\n");
    for (;;) {
        ssize_t r = read_line(&c, line, sizeof line, &complete);
        if (r <= 0)
            return;
        if (!complete) {
            say(fd, "-ERR line too long\r\n");
            return;
        }
        chomp(line);
        if (verb(line, "USER") || verb(line, "PASS") || verb(line, "NOOP")) {
            say(fd, "+OK\r\n");
        } else if (verb(line, "STAT")) {
            long total = 0;
            int cnt = 0;
            for (int i = 0; i < n; i++)
                if (!m[i].deleted) {
                    cnt++;
                    total += m[i].size;
                }
            snprintf(reply, sizeof reply, "+OK %d %ld\r\n", cnt, total);
            say(fd, reply);
        } else if (verb(line, "LIST") && line[4] == '\0') {
            say(fd, "+OK\r\n");
            for (int i = 0; i < n; i++)
                if (!m[i].deleted) {
                    snprintf(reply, sizeof reply, "%d %ld\r\n", i + 1, m[i].size);
                    say(fd, reply);
                }
            say(fd, ".\r\n");
        } else if (verb(line, "LIST")) {
            int k = msg_arg(line, 4, m, n);
            if (!k) {
                say(fd, "-ERR no such message\r\n");
                continue;
            }
            snprintf(reply, sizeof reply, "+OK %d %ld\r\n", k, m[k - 1].size);
            say(fd, reply);
        } else if (verb(line, "RETR")) {
            int k = msg_arg(line, 4, m, n);
            if (!k) {
                say(fd, "-ERR no such message\r\n");
                continue;
            }
            if (pop3_retr(fd, &m[k - 1]) < 0)
                return;
        } else if (verb(line, "DELE")) {
            int k = msg_arg(line, 4, m, n);
            if (!k) {
                say(fd, "-ERR no such message\r\n");
                continue;
            }
            m[k - 1].deleted = 1;
            say(fd, "+OK deleted\r\n");
        } else if (verb(line, "RSET")) {
            for (int i = 0; i < n; i++)
                m[i].deleted = 0;
            say(fd, "+OK\r\n");
        } else if (verb(line, "QUIT")) {
            char path[4096];
            for (int i = 0; i < n; i++)
                if (m[i].deleted) {
                    if (mkpath(path, sizeof path, "new", m[i].name) == 0)
                        unlink(path);
                }
            say(fd, "+OK bye\r\n");
            return;
        } else {
            say(fd, "-ERR unknown command\r\n");
        }
    }
}

static int listen_on(int port)
{
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0)
        return -1;
    int one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    a.sin_addr.s_addr = htonl(INADDR_ANY);
    if (bind(s, (struct sockaddr *)&a, sizeof a) < 0 || listen(s, 16) < 0) {
        close(s);
        return -1;
    }
    return s;
}

static int serve(const char *dir)
{
    char path[4096];
    if (strlen(dir) > 1024) {
        fprintf(stderr, "minimail serve: directory name too long\n");
        return 2;
    }
    g_dir = dir;
    const char *subs[] = {"", "tmp", "new"};
    for (int i = 0; i < 3; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, subs[i]);
        if (mkdir(path, 0755) < 0 && errno != EEXIST) {
            fprintf(stderr, "minimail serve: mkdir %s: %s\n", path, strerror(errno));
            return 1;
        }
    }
    signal(SIGPIPE, SIG_IGN);
    signal(SIGCHLD, SIG_IGN);       /* children are reaped automatically */
    int smtp = listen_on(25), pop = listen_on(110);
    if (smtp < 0 || pop < 0) {
        perror("minimail serve: listen");
        return 1;
    }
    printf("serving smtp 25 pop3 110 in %s\n", dir);
    fflush(stdout);
    for (;;) {
        struct pollfd p[2] = {{.fd = smtp, .events = POLLIN}, {.fd = pop, .events = POLLIN}};
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            perror("minimail serve: poll");
            return 1;
        }
        for (int i = 0; i < 2; i++) {
            if (!(p[i].revents & POLLIN))
                continue;
            int c = accept(p[i].fd, NULL, NULL);
            if (c < 0)
                continue;
            pid_t pid = fork();
            if (pid == 0) {
                close(smtp);
                close(pop);
                if (i == 0)
                    smtp_session(c);
                else
                    pop3_session(c);
                close(c);
                _exit(0);
            }
            close(c);
        }
    }
}

/* ---- clients --------------------------------------------------------------------------------- */

static int dial(const char *addr, int port)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    if (inet_pton(AF_INET, addr, &a.sin_addr) != 1) {
        fprintf(stderr, "minimail: bad address %s\n", addr);
        return -1;
    }
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0 || connect(s, (struct sockaddr *)&a, sizeof a) < 0) {
        perror("minimail: connect");
        if (s >= 0)
            close(s);
        return -1;
    }
    return s;
}

/* read one reply (SMTP: through the last "NNN " line); fail unless it starts with want */
static int expect(struct conn *c, const char *want, const char *what)
{
    char line[MAX_LINE + 2];
    int complete;
    for (;;) {
        ssize_t n = read_line(c, line, sizeof line, &complete);
        if (n < 0) {
            fprintf(stderr, "minimail: %s: read: %s\n", what, strerror(errno));
            return -1;
        }
        if (n == 0) {
            fprintf(stderr, "minimail: %s: connection closed\n", what);
            return -1;
        }
        if (n >= 4 && line[3] == '-' && want[0] != '+')
            continue;          /* SMTP continuation line */
        chomp(line);
        if (strncmp(line, want, strlen(want)) != 0) {
            fprintf(stderr, "minimail: %s: unexpected reply: %.200s\n", what, line);
            return -1;
        }
        return 0;
    }
}

static int send_cmd(int fd, const char *cmd, const char *what)
{
    if (say(fd, cmd) < 0) {
        fprintf(stderr, "minimail: %s: write: %s\n", what, strerror(errno));
        return -1;
    }
    return 0;
}

static int do_send(const char *addr, const char *file, const char *from, const char *to)
{
    FILE *f = fopen(file, "rb");
    if (!f) {
        perror("minimail send: open");
        return 1;
    }
    signal(SIGPIPE, SIG_IGN);
    int s = dial(addr, 25);
    if (s < 0) {
        fclose(f);
        return 1;
    }
    struct conn c = {.fd = s};
    char cmd[MAX_LINE];
    int rc = 1;
    if (expect(&c, "220", "greeting") < 0 || send_cmd(s, "EHLO client.test\r\n", "EHLO") < 0 ||
        expect(&c, "250", "EHLO") < 0)
        goto out;
    snprintf(cmd, sizeof cmd, "MAIL FROM:<%.200s>\r\n", from);
    if (send_cmd(s, cmd, "MAIL") < 0 || expect(&c, "250", "MAIL") < 0)
        goto out;
    snprintf(cmd, sizeof cmd, "RCPT TO:<%.200s>\r\n", to);
    if (send_cmd(s, cmd, "RCPT") < 0 || expect(&c, "250", "RCPT") < 0 ||
        send_cmd(s, "DATA\r\n", "DATA") < 0 || expect(&c, "354", "DATA") < 0)
        goto out;
    char buf[8192], out[2 * 8192];
    int bol = 1;
    char last = '\n';
    size_t got;
    while ((got = fread(buf, 1, sizeof buf, f)) > 0) {
        size_t o = 0;
        for (size_t i = 0; i < got; i++) {
            if (bol && buf[i] == '.')
                out[o++] = '.';
            out[o++] = buf[i];
            bol = buf[i] == '\n';
            last = buf[i];
        }
        if (write_all(s, out, o) < 0) {
            fprintf(stderr, "minimail: body: write: %s\n", strerror(errno));
            goto out;
        }
    }
    if (send_cmd(s, last == '\n' ? ".\r\n" : "\r\n.\r\n", "end of data") < 0 ||
        expect(&c, "250", "end of data") < 0 || send_cmd(s, "QUIT\r\n", "QUIT") < 0 ||
        expect(&c, "221", "QUIT") < 0)
        goto out;
    printf("sent\n");
    rc = 0;
out:
    fclose(f);
    close(s);
    return rc;
}

static int do_fetch(const char *addr, const char *num, const char *outfile)
{
    char *end;
    long k = strtol(num, &end, 10);
    if (*end != '\0' || k < 1 || k > 1000000) {
        fprintf(stderr, "minimail fetch: bad message number %s\n", num);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    int s = dial(addr, 110);
    if (s < 0)
        return 1;
    struct conn c = {.fd = s};
    FILE *out = NULL;
    char cmd[64], line[MAX_LINE + 2];
    int rc = 1, complete, bol = 1;
    long total = 0;
    if (expect(&c, "+OK", "greeting") < 0 || send_cmd(s, "USER test\r\n", "USER") < 0 ||
        expect(&c, "+OK", "USER") < 0 || send_cmd(s, "PASS test\r\n", "PASS") < 0 ||
        expect(&c, "+OK", "PASS") < 0)
        goto done;
    snprintf(cmd, sizeof cmd, "RETR %ld\r\n", k);
    if (send_cmd(s, cmd, "RETR") < 0 || expect(&c, "+OK", "RETR") < 0)
        goto done;
    out = fopen(outfile, "wb");
    if (!out) {
        perror("minimail fetch: open");
        goto done;
    }
    for (;;) {
        ssize_t n = read_line(&c, line, sizeof line, &complete);
        if (n < 0) {
            fprintf(stderr, "minimail: message: read: %s\n", strerror(errno));
            goto done;
        }
        if (n == 0) {
            fprintf(stderr, "minimail: message: connection closed\n");
            goto done;
        }
        const char *p = line;
        size_t len = (size_t)n;
        if (bol && line[0] == '.') {
            if (strcmp(line, ".\r\n") == 0 || strcmp(line, ".\n") == 0)
                break;
            p++;
            len--;
        }
        bol = complete;
        total += (long)len;
        if (fwrite(p, 1, len, out) != len) {
            perror("minimail fetch: write");
            goto done;
        }
    }
    if (fclose(out) != 0) {
        out = NULL;
        perror("minimail fetch: close");
        goto done;
    }
    out = NULL;
    send_cmd(s, "QUIT\r\n", "QUIT");
    expect(&c, "+OK", "QUIT");
    printf("fetched %ld\n", total);
    rc = 0;
done:
    if (out)
        fclose(out);
    close(s);
    return rc;
}

static int usage(void)
{
    fprintf(stderr, "usage: minimail serve DIR | minimail send ADDR FILE [FROM [TO]] | minimail fetch ADDR N OUT\n");
    return 2;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        return usage();
    if (strcmp(argv[1], "serve") == 0 && argc == 3)
        return serve(argv[2]);
    if (strcmp(argv[1], "send") == 0 && argc >= 4 && argc <= 6)
        return do_send(argv[2], argv[3], argc > 4 ? argv[4] : "alice@test", argc > 5 ? argv[5] : "bob@test");
    if (strcmp(argv[1], "fetch") == 0 && argc == 5)
        return do_fetch(argv[2], argv[3], argv[4]);
    return usage();
}
