/*
 * Guest memory: the regions of a SET_MEM_TABLE, mapped into this process, and the
 * bounds-checked translations every guest address goes through.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <linux/magic.h>
#include <unistd.h>
#include "vn_internal.h"

/* [base, base+size) contains [addr, addr+len)?  Written so that no sum can overflow. */
static inline int range_in(uint64_t base, uint64_t size, uint64_t addr, uint64_t len)
{
    return addr >= base && addr - base < size && len <= size - (addr - base);
}

/* Host pointer of guest-physical [gpa, gpa+len) if it lies inside one region, else NULL.
 * len == 0 still requires gpa itself to be mapped. */
uint8_t *vn_mem_gpa(struct vn_mem *m, uint64_t gpa, uint64_t len)
{
    for (unsigned i = 0; i < m->n; i++) {
        struct vn_region *r = &m->r[i];
        if (range_in(r->gpa, r->size, gpa, len ? len : 1))
            return r->host + (gpa - r->gpa);
    }
    return NULL;
}

/* The same for the frontend's (QEMU's) virtual addresses, which SET_VRING_ADDR uses. */
uint8_t *vn_mem_uva(struct vn_mem *m, uint64_t uva, uint64_t len)
{
    for (unsigned i = 0; i < m->n; i++) {
        struct vn_region *r = &m->r[i];
        if (range_in(r->uva, r->size, uva, len ? len : 1))
            return r->host + (uva - r->uva);
    }
    return NULL;
}

/* Translates [gpa, gpa+len) into host pieces, splitting where it crosses from one region
 * into an adjacent one.  Fails (-1) if any byte is unmapped or more than `max` pieces
 * would be needed. */
int vn_mem_iov(struct vn_mem *m, uint64_t gpa, uint64_t len,
               struct vn_iov *iov, unsigned max, unsigned *n)
{
    if (len > UINT64_MAX - gpa)
        return -1;
    while (len > 0) {
        struct vn_region *hit = NULL;
        struct vn_region *h = &m->r[m->hint];
        if (m->hint < m->n && gpa >= h->gpa && gpa - h->gpa < h->size) {
            hit = h;
        } else {
            for (unsigned i = 0; i < m->n; i++) {
                struct vn_region *r = &m->r[i];
                if (gpa >= r->gpa && gpa - r->gpa < r->size) {
                    hit = r;
                    m->hint = i;
                    break;
                }
            }
        }
        if (!hit || *n >= max)
            return -1;
        uint64_t room = hit->size - (gpa - hit->gpa);
        uint64_t take = len < room ? len : room;
        if (take > UINT32_MAX)
            take = UINT32_MAX;
        iov[*n].p = hit->host + (gpa - hit->gpa);
        iov[*n].len = (uint32_t)take;
        iov[*n].gpa = gpa;
        (*n)++;
        gpa += take;
        len -= take;
    }
    return 0;
}

/* Copies guest-physical [gpa, gpa+len) into dst; -1 if any of it is unmapped. */
int vn_mem_read(struct vn_mem *m, uint64_t gpa, void *dst, uint64_t len)
{
    struct vn_iov iov[4];
    unsigned n = 0;
    if (vn_mem_iov(m, gpa, len, iov, 4, &n) < 0)
        return -1;
    uint8_t *d = dst;
    for (unsigned i = 0; i < n; i++) {
        /* volatile: one load of each guest byte, never re-read behind our back */
        const volatile uint8_t *s = iov[i].p;
        for (uint32_t k = 0; k < iov[i].len; k++)
            d[k] = s[k];
        d += iov[i].len;
    }
    return 0;
}

/* ---- the SIGBUS guard ----
 *
 * A file mapped here (guest memory, the dirty log) is the frontend's: it can ftruncate it
 * after we checked its size, and our next access past the new end raises SIGBUS, which
 * would kill the daemon and every NI in it.  Sealed memfds (F_SEAL_SHRINK: QEMU's
 * memory-backend-memfd) cannot shrink, but hugetlbfs and tmpfs files, and DPDK's unsealed
 * memfds, can.  So each such mapping is registered here; a SIGBUS inside one replaces the
 * rest of that mapping with anonymous zero pages (the faulting access then completes),
 * sets its flag, and the switch breaks that one port on its next pass.  A SIGBUS anywhere
 * else goes to the disposition that was there before, and kills as it would have. */

#define VN_GUARDS (VN_MAX_PORTS * (VN_MAX_REGIONS + 1) * 4)
struct vn_guard {
    uintptr_t start, end;      /* start 0: a free slot */
    uintptr_t page;            /* the mapping's page size (hugetlbfs: a huge page) */
    int *faulted;
};
static struct vn_guard guards[VN_GUARDS];
static struct sigaction bus_old;
static int bus_installed;
static uintptr_t bus_page;

static void bus_handler(int sig, siginfo_t *si, void *uc)
{
    (void)sig;
    (void)uc;
    if (si->si_code <= 0)
        return;                  /* sent by kill(2) or sigqueue(3), not a fault: nothing to mend */
    uintptr_t a = (uintptr_t)si->si_addr;
    for (unsigned i = 0; i < VN_GUARDS; i++) {
        uintptr_t s = __atomic_load_n(&guards[i].start, __ATOMIC_ACQUIRE);
        if (!s || a < s || a >= guards[i].end)
            continue;
        /* from the faulting page (a huge page in hugetlbfs: the kernel splits nothing smaller)
         * to the mapping's end, rounded up to that page as the kernel rounded the mapping */
        uintptr_t pg = guards[i].page;
        uintptr_t from = a & ~(pg - 1), to = (guards[i].end + pg - 1) & ~(pg - 1);
        if (from < s)
            from = s;
        if (mmap((void *)from, to - from, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0) != MAP_FAILED) {
            __atomic_store_n(guards[i].faulted, 1, __ATOMIC_RELAXED);
            return;              /* the access runs again, on zeros */
        }
        break;
    }
    /* not ours (or no remedy): the disposition from before, and the fault again kills as it
     * would have; a later guest mapping installs the guard again */
    sigaction(SIGBUS, &bus_old, NULL);
    bus_installed = 0;
}

/* The page size a mapping of `fd` is made of: a huge page's on hugetlbfs (st_blksize there),
 * else 0 (the system's).  Only hugetlbfs: tmpfs with huge pages, NFS and others report a large
 * st_blksize too, but map in system pages, and mending past a mapping's end would zero
 * whatever is mapped next. */
static size_t huge_page_size(int fd, const struct stat *st)
{
    struct statfs fs;
    if (fstatfs(fd, &fs) == 0 && fs.f_type == HUGETLBFS_MAGIC && st->st_blksize > 0)
        return (size_t)st->st_blksize;
    return 0;
}

int vn_guard_add(void *start, size_t len, size_t page, int *faulted)
{
    if (!bus_installed) {
        struct sigaction sa;
        memset(&sa, 0, sizeof(sa));
        sa.sa_sigaction = bus_handler;
        sa.sa_flags = SA_SIGINFO | SA_NODEFER;
        sigemptyset(&sa.sa_mask);
        bus_page = (uintptr_t)sysconf(_SC_PAGESIZE);
        if (sigaction(SIGBUS, &sa, &bus_old) < 0)
            return -1;
        bus_installed = 1;
    }
    for (unsigned i = 0; i < VN_GUARDS; i++) {
        if (guards[i].start)
            continue;
        guards[i].end = (uintptr_t)start + len;
        /* a power of two no smaller than the system's page (st_blksize: the huge page size in
         * hugetlbfs, the system page in tmpfs and memfds) */
        guards[i].page = page > bus_page && !(page & (page - 1)) ? page : bus_page;
        guards[i].faulted = faulted;
        __atomic_store_n(&guards[i].start, (uintptr_t)start, __ATOMIC_RELEASE);
        return 0;
    }
    return -1;
}

void vn_guard_del(void *start)
{
    for (unsigned i = 0; i < VN_GUARDS; i++)
        if (guards[i].start == (uintptr_t)start)
            __atomic_store_n(&guards[i].start, 0, __ATOMIC_RELEASE);
}

void vn_mem_unmap(struct vn_mem *m)
{
    for (unsigned i = 0; i < m->n; i++)
        if (m->r[i].map_base) {
            vn_guard_del(m->r[i].map_base);
            munmap(m->r[i].map_base, m->r[i].map_len);
        }
    memset(m, 0, sizeof(*m));
}

/* Maps a new table.  On failure nothing of the new table stays mapped and *m is untouched;
 * on success the old table is unmapped and replaced.  The fds stay the caller's. */
int vn_mem_map(struct vn_mem *m, unsigned n, const struct vn_region_spec *spec, const int *fds)
{
    struct vn_mem next;
    memset(&next, 0, sizeof(next));
    if (n > VN_MAX_REGIONS)
        return VN_ERANGE;
    long page = sysconf(_SC_PAGESIZE);
    for (unsigned i = 0; i < n; i++) {
        const struct vn_region_spec *s = &spec[i];
        struct stat stbuf;
        if (s->memory_size == 0 ||
            s->memory_size > UINT64_MAX - s->guest_phys_addr ||
            s->memory_size > UINT64_MAX - s->userspace_addr ||
            s->mmap_offset > UINT64_MAX - s->memory_size)
            goto bad;
        /* Mapping past the end of the file would turn a guest access into SIGBUS. */
        if (fstat(fds[i], &stbuf) < 0 || stbuf.st_size < 0 ||
            (uint64_t)stbuf.st_size < s->mmap_offset + s->memory_size)
            goto bad;
        for (unsigned j = 0; j < i; j++) {
            const struct vn_region_spec *o = &spec[j];
            if (s->guest_phys_addr < o->guest_phys_addr + o->memory_size &&
                o->guest_phys_addr < s->guest_phys_addr + s->memory_size)
                goto bad;
        }
        uint64_t off_pages = s->mmap_offset & ~((uint64_t)page - 1);
        uint64_t lead = s->mmap_offset - off_pages;
        size_t len = (size_t)(lead + s->memory_size);
        void *base = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE,
                          fds[i], (off_t)off_pages);
        if (base == MAP_FAILED)
            goto bad;
        next.r[i].gpa = s->guest_phys_addr;
        next.r[i].size = s->memory_size;
        next.r[i].uva = s->userspace_addr;
        next.r[i].host = (uint8_t *)base + lead;
        next.r[i].map_base = base;
        next.r[i].map_len = len;
        next.r[i].map_page = huge_page_size(fds[i], &stbuf);
        next.n = i + 1;
    }
    vn_mem_unmap(m);
    *m = next;
    for (unsigned i = 0; i < m->n; i++)
        if (vn_guard_add(m->r[i].map_base, m->r[i].map_len, m->r[i].map_page, &m->faulted) < 0) {
            vn_mem_unmap(m);
            return VN_EMAP;
        }
    return VN_OK;
bad:
    vn_mem_unmap(&next);
    return VN_EMAP;
}

/* ---- dirty-page log (live migration) ---- */

#define VN_LOG_PAGE_SHIFT 12
/* 1 GiB of bitmap covers 32 TiB of guest memory: anything larger is not a real log */
#define VN_LOG_MAX (1ULL << 30)

void vn_log_unmap(struct vn_port *p)
{
    if (p->log_map) {
        vn_guard_del(p->log_map);
        munmap(p->log_map, p->log_map_len);
    }
    p->log_faulted = 0;
    p->log = NULL;
    p->log_map = NULL;
    p->log_map_len = 0;
    p->log_size = 0;
}

/* Maps the bitmap of SET_LOG_BASE.  Refuses (leaving the old log in place) a size of 0 or
 * beyond VN_LOG_MAX, an offset+size that overflows or runs past the end of the file (a
 * write there would be SIGBUS), and a bitmap too small for the memory table. */
int vn_log_map(struct vn_port *p, int fd, uint64_t size, uint64_t offset)
{
    struct stat st;
    if (size == 0 || size > VN_LOG_MAX || offset > UINT64_MAX - size)
        return VN_ERANGE;
    if (fstat(fd, &st) < 0 || st.st_size < 0 || (uint64_t)st.st_size < offset + size)
        return VN_EMAP;
    for (unsigned i = 0; i < p->mem.n; i++) {
        uint64_t last = (p->mem.r[i].gpa + p->mem.r[i].size - 1) >> VN_LOG_PAGE_SHIFT;
        if (last / 8 >= size)
            return VN_ERANGE;
    }
    uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
    uint64_t off_pages = offset & ~(page - 1);
    uint64_t lead = offset - off_pages;
    size_t len = (size_t)(lead + size);
    void *base = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)off_pages);
    if (base == MAP_FAILED)
        return VN_EMAP;
    vn_log_unmap(p);
    if (vn_guard_add(base, len, huge_page_size(fd, &st), &p->log_faulted) < 0) {
        munmap(base, len);
        return VN_EMAP;
    }
    p->log_map = base;
    p->log_map_len = len;
    p->log = (uint8_t *)base + lead;
    p->log_size = size;
    return VN_OK;
}

/* Sets the bits of every page of [gpa, gpa+len) (atomic OR: QEMU reads and clears the
 * bitmap concurrently).  Called after the write, so a bit QEMU clears is for data it will
 * read.  Pages beyond the bitmap are ignored (vn_log_map checked it covers the memory
 * table; a later, larger table comes with a new log). */
void vn_log_mark(struct vn_port *p, uint64_t gpa, uint64_t len)
{
    if (!p->log || !len || !HAS_FEATURE(p->features, VHOST_F_LOG_ALL))
        return;
    if (len > UINT64_MAX - gpa)
        len = UINT64_MAX - gpa;
    uint64_t first = gpa >> VN_LOG_PAGE_SHIFT;
    uint64_t last = (gpa + len - 1) >> VN_LOG_PAGE_SHIFT;
    for (uint64_t pg = first; pg <= last && pg / 8 < p->log_size; pg++)
        __atomic_fetch_or(&p->log[pg / 8], (uint8_t)(1u << (pg % 8)), __ATOMIC_RELAXED);
}
