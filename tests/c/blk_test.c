/* csrc/blkcache.c on its own (tests/test_blkcache.py): `bounds` checks every request size
 * against what it gets and the cache's byte cap; `uaf` writes into a block it gave back,
 * which must fault when built with AddressSanitizer. */
#include <stdio.h>
#include <string.h>
#include <malloc.h>
#include "vn_internal.h"

static int bounds(void)
{
    struct vn_blkcache c = {.max_bytes = 64 * 1024};
    for (size_t size = 1; size <= 3 * VN_BLK_MAX; size++) {
        unsigned char *b = vn_blk_get(&c, size);
        if (!b)
            return printf("no block for %zu\n", size), 1;
        size_t got = malloc_usable_size(b);
        /* enough, and never more than twice (plus malloc's rounding) what was asked */
        if (got < size || (size >= VN_BLK_MIN && got > 2 * size + 32) ||
            (size < VN_BLK_MIN && got > VN_BLK_MIN + 32))
            return printf("size %zu got %zu\n", size, got), 1;
        memset(b, 0xa5, size);
        vn_blk_put(&c, b, size);
        if (c.bytes > c.max_bytes)
            return printf("cache holds %zu > %zu\n", c.bytes, c.max_bytes), 1;
    }
    /* a burst larger than the cap: it keeps at most max_bytes, and reuses what it keeps */
    vn_blk_drain(&c);
    void *blk[200];
    for (int i = 0; i < 200; i++)
        blk[i] = vn_blk_get(&c, 1000);
    for (int i = 0; i < 200; i++)
        vn_blk_put(&c, blk[i], 1000);
    if (c.bytes != c.max_bytes)     /* 1,000 bytes take a 1 KiB block: 64 fill the cap */
        return printf("after a burst the cache holds %zu of %zu\n", c.bytes, c.max_bytes), 1;
    void *again = vn_blk_get(&c, 900);  /* the same class: from the cache */
    if (c.bytes != c.max_bytes - 1024)
        return printf("a get took nothing from the cache (%zu)\n", c.bytes), 1;
    vn_blk_put(&c, again, 900);
    vn_blk_drain(&c);
    if (c.bytes != 0)
        return printf("drained cache holds %zu\n", c.bytes), 1;
    puts("ok");
    return 0;
}

static int uaf(void)
{
    struct vn_blkcache c = {.max_bytes = 64 * 1024};
    unsigned char *b = vn_blk_get(&c, 500);
    vn_blk_put(&c, b, 500);
    volatile unsigned char *p = b;
    p[100] = 1;                    /* must fault under ASan */
    puts("not caught");
    return 0;
}

int main(int argc, char **argv)
{
    if (argc > 1 && !strcmp(argv[1], "uaf"))
        return uaf();
    return bounds();
}
