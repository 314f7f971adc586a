/*
 * Free-block caches for records the data path makes and frees per frame (the TCP engine's
 * kept segments, the policy's held frames): glibc serves blocks of these sizes from its
 * bins, not its thread cache, and a burst of records made and freed cost a tenth of the
 * NI's time in malloc and free.
 *
 * Blocks come in power-of-two size classes (VN_BLK_MIN..VN_BLK_MAX bytes): a record never
 * takes more than twice what it needs, so a memcap that counts frame bytes still bounds
 * memory (a fixed large block per record would let a guest's tiny segments take thirty
 * times what they are counted as).  Larger records are malloc'd to size and freed at once.
 * At most `max_bytes` of free blocks wait per cache.  A free block is poisoned for the
 * sanitizer while it waits (VN_POISON): a use after free still faults under ASan.
 * This file calls nothing outside itself (and libc).
 */
#include <stdlib.h>
#include "vn_internal.h"

_Static_assert((VN_BLK_MIN << (VN_BLK_CLASSES - 1)) == VN_BLK_MAX, "classes span MIN..MAX");

/* The class of a `size`-byte block: its index, or -1 if it is larger than VN_BLK_MAX. */
static int blk_class(size_t size)
{
    if (size > VN_BLK_MAX)
        return -1;
    int k = 0;
    size_t cap = VN_BLK_MIN;
    while (cap < size) {
        cap <<= 1;
        k++;
    }
    return k;
}

static size_t class_size(int k) { return (size_t)VN_BLK_MIN << k; }

void *vn_blk_get(struct vn_blkcache *c, size_t size)
{
    int k = blk_class(size);
    if (k < 0)
        return malloc(size);
    void *b = c->head[k];
    if (!b)
        return malloc(class_size(k));
    VN_UNPOISON(b, class_size(k));
    c->head[k] = *(void **)b;
    c->bytes -= class_size(k);
    return b;
}

void vn_blk_put(struct vn_blkcache *c, void *b, size_t size)
{
    if (!b)
        return;
    int k = blk_class(size);
    if (k < 0 || c->bytes + class_size(k) > c->max_bytes) {
        free(b);
        return;
    }
    *(void **)b = c->head[k];
    c->head[k] = b;
    c->bytes += class_size(k);
    VN_POISON(b, class_size(k));
}

void vn_blk_drain(struct vn_blkcache *c)
{
    for (int k = 0; k < VN_BLK_CLASSES; k++)
        while (c->head[k]) {
            void *b = c->head[k];
            VN_UNPOISON(b, class_size(k));
            c->head[k] = *(void **)b;
            free(b);
        }
    c->bytes = 0;
}
